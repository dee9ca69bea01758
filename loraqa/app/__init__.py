"""The applications on top: argument parsing (flags and YAML -> settings dataclasses) and the Gradio demo;
the command line itself is `loraqa.cli`."""
