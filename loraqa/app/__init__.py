"""The application on top of every stage: the Gradio demo (`demo`: models and page, `demo_view`: the pure
view). The command line itself is `loraqa.cli`."""
