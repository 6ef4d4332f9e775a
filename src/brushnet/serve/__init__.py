"""`brushnet serve`: a web UI (gradio) over the library, for one machine or a small team.

- `command`: the sub-command and its options (`add_serve_command`, `cmd_serve`);
- `models`: the `--models` entries (BrushNet or PowerPaint), checked at start, loaded on first use, one
  held at a time;
- `inputs`: what a request may carry (limits, the hole from strokes and/or a mask, settings, the task);
- `selection`: the hole selected by clicks or words (`--segmenter`/`--detector`, loaded on first use);
- `generation`: one generation at a time on the device, cancellable, results as PNGs with parameters;
- `app`: the page and its endpoints (`/inpaint`, `/outpaint`).

gradio is imported only when the server starts: `pip install "brushnet[serve]"`.
"""

from .command import add_serve_command

__all__ = ["add_serve_command"]
