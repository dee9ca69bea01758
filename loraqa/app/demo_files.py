"""What `loraqa demo` may open and who may reach it: the Errors tab's allow-list, uploads off, the `--host`/`--auth`
rule.

Input: the evaluation files the demo was started with (`--errors`), the results folder, the asset cache, the
host and auth flags. Output: resolved paths, or one refusal line. Pure Python (no torch, no gradio), so that
`loraqa demo` checks its flags before the heavy imports.

The Errors tab opens an evaluation only when its path, symlinks resolved, is a file given with `--errors` or
a file under `results/` (a symlink under results/ that leads outside is outside); a path with `..` is refused
before it is looked at. Every other path gets the same line, `REFUSAL`, whether it is missing, a directory or
a readable file elsewhere, so the page cannot be used to probe which paths exist. An evaluation's "data" is
read only from the fetched SQuAD files (the alias 'squad', or a path ending in squad/dev-v1.1.json or
squad/train-v1.1.json, which `loraqa evaluate` writes: the local fetched file of that name is read, not the
path) or from a file under results/; never from a hub dataset.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError
from ..data.assets import SQUAD_FILES

REFUSAL = ("Refused: the Errors tab opens only the evaluation files the demo was started with (--errors) and "
           "files under results/.")
SQUAD_ASSET_DIR = "squad"  # fetch("squad") writes SQUAD_FILES into cache_dir/squad


class RefusedPath(ConfigError):
    """A path outside the demo's allow-list; the message never says whether the path exists."""


def _resolved_file(text: str) -> Path | None:
    """The existing regular file `text` names, symlinks resolved; None for anything else (and for `..`)."""
    if not text or "\x00" in text or ".." in Path(text).parts:
        return None
    try:
        resolved = Path(text).resolve(strict=True)
        return resolved if resolved.is_file() else None
    except (OSError, RuntimeError, ValueError):  # missing, unreadable folder, a symlink loop
        return None


@dataclass(frozen=True)
class AllowList:
    """One demo's allow-list, resolved once at start (relative paths are relative to where it was started).

    >>> files = AllowList.create(["runs/eval_a.json"], results_dir="results", cache_dir="data")
    >>> files.evaluation("results/eval_b.json")   # -> Path('/abs/results/eval_b.json')
    >>> files.evaluation("/etc/passwd")           # -> RefusedPath(REFUSAL)
    """
    evaluations: frozenset[Path]
    results_dir: Path
    squad_dir: Path

    @classmethod
    def create(cls, errors=(), *, results_dir: str | Path = "results", cache_dir: str | Path) -> AllowList:
        given = (_resolved_file(str(path).strip()) for path in errors)
        return cls(frozenset(path for path in given if path), Path(results_dir).resolve(),
                   Path(cache_dir).resolve() / SQUAD_ASSET_DIR)

    def _in_results(self, path: Path) -> bool:
        return path.is_relative_to(self.results_dir)

    def evaluation(self, path: str) -> Path:
        """The file to read for an evaluation path typed on the page; RefusedPath(REFUSAL) for any other."""
        resolved = _resolved_file(str(path or "").strip())
        if resolved is None or not (resolved in self.evaluations or self._in_results(resolved)):
            raise RefusedPath(REFUSAL)
        return resolved

    def squad_data(self, data, split: str, *, evaluation: str) -> Path:
        """The SQuAD file to read for an evaluation's "data" field: a fetched SQuAD file or a file under
        results/, else RefusedPath naming the evaluation and the field (the same line whether it exists).

        'squad', split 'validation'                -> cache_dir/squad/dev-v1.1.json
        '/elsewhere/data/squad/train-v1.1.json'   -> cache_dir/squad/train-v1.1.json (that path is not read)
        'results/my_squad.json'                   -> /abs/results/my_squad.json
        'rajpurkar/squad', '/etc/passwd'          -> RefusedPath
        """
        text = data.strip() if isinstance(data, str) else ""
        parts = Path(text).parts
        name = ("train-v1.1.json" if split == "train" else "dev-v1.1.json") if text == "squad" else \
            parts[-1] if len(parts) >= 2 and parts[-2] == SQUAD_ASSET_DIR and parts[-1] in SQUAD_FILES else None
        if name is not None:
            fetched = self.squad_dir / name
            if not fetched.is_file():
                raise RefusedPath(f"{evaluation}: field 'data' names the fetched SQuAD file {name}, which is not "
                                  f"in {self.squad_dir} (run `loraqa fetch squad`)")
            return fetched
        resolved = _resolved_file(text)
        if resolved is None or not self._in_results(resolved):
            raise RefusedPath(f"{evaluation}: field 'data' ({text[:200]!r}) is neither the fetched SQuAD ('squad') "
                              "nor a file under results/: the demo reads no other data")
        return resolved


def is_loopback(host: str) -> bool:
    """'127.0.0.1', '127.0.0.2', '::1', '[::1]', 'localhost' -> True; '0.0.0.0', '', '192.168.1.5' -> False."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def launch_auth(host: str, auth: str | None, no_auth_i_understand: bool = False) -> tuple[str, str] | None:
    """Gradio's `launch(auth=...)` for `--auth USER:PASSWORD` (None without it). A host other than loopback
    needs `--auth` or `--no_auth_i_understand true`: ConfigError otherwise. The password is never echoed."""
    if auth is not None:
        user, colon, password = auth.partition(":")
        if not (user and colon and password):
            raise ConfigError("--auth: expected USER:PASSWORD (both non-empty, separated by ':')")
        return user, password
    if not is_loopback(host) and not no_auth_i_understand:
        raise ConfigError(f"--host {host} lets other machines reach the demo: give --auth USER:PASSWORD, or "
                          "--no_auth_i_understand true to serve it without a password")
    return None


class NoUploads:
    """ASGI middleware: uploads are off. 403 for Gradio's upload routes (/upload, /process_recording) and for
    every other multipart/form-data request (the component server's file route) but the login form's, which
    the browser sends as form data; the page itself has no upload component, so nothing it does is refused."""
    BLOCKED_SUFFIXES = ("/upload", "/process_recording")

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            multipart = any(name.lower() == b"content-type" and value.strip().lower().startswith(b"multipart/")
                            for name, value in scope.get("headers") or [])  # every such header: any may be read
            path = scope["path"].rstrip("/")
            if path.endswith(self.BLOCKED_SUFFIXES) or (multipart and not path.endswith("/login")):
                await send({"type": "http.response.start", "status": 403,
                            "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
                await send({"type": "http.response.body", "body": b"uploads are off in the loraqa demo"})
                return
        await self.app(scope, receive, send)
