"""`brushnet serve`: the web UI's command line.

Wiring (in brushnet/cli.py's `build_parser`): `from .serve import add_serve_command;
add_serve_command(commands)`. Nothing here imports gradio or torch until the command runs, so
`brushnet --help` stays fast.
"""

import argparse
import signal
import sys

from ..options import add_loading_options

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_MAX_UPLOAD_MB = 50.0


def add_serve_command(commands) -> argparse.ArgumentParser:
    """Add the `serve` sub-command to an argparse sub-parsers object; returns its parser."""
    serve = commands.add_parser(
        "serve", help="a web UI in the browser: paint or click the hole, inpaint, outpaint (needs brushnet[serve])",
        description="Serve a web UI (gradio) for inpainting and outpainting with the built-in demo model and the "
                    "models given with --models. One generation runs at a time; other requests wait in a queue. "
                    "Install with pip install \"brushnet[serve]\".")
    serve.add_argument(
        "--models", nargs="+", action="extend", default=[], metavar="MODEL",
        help="models to offer, each a BrushNet pipeline folder (model_index.json with a brushnet entry), "
             "BASE::BRUSHNET (a base model folder or checkpoint file, and a BrushNet or PowerPaint v2 folder or "
             ".safetensors file) or a PowerPaint v2 release folder; local paths only. The built-in demo model is "
             "always offered; the first entry is preselected")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every "
                            "network, with --auth)")
    serve.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    serve.add_argument("--auth", metavar="USER:PASS", help="ask for this user name and password (basic login)")
    serve.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                       help=f"largest image accepted, in pixels (default {DEFAULT_MAX_PIXELS} = 4096x4096)")
    serve.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                       help=f"largest file accepted per upload, in MB (default {DEFAULT_MAX_UPLOAD_MB:g}; the "
                            "editor sends its canvas as PNG)")
    selection = serve.add_argument_group("selecting without painting (loaded on first use)")
    selection.add_argument("--segmenter", metavar="SAM",
                           help="SAM checkpoint for clicks in the page: a folder, or a hub id already downloaded "
                                "(e.g. facebook/sam-vit-base)")
    selection.add_argument("--detector", metavar="DET",
                           help="open-vocabulary detector for selecting by words, with --segmenter: a folder or a "
                                "downloaded hub id (e.g. IDEA-Research/grounding-dino-tiny)")
    group = serve.add_argument_group("model loading (as for brushnet inpaint)")
    add_loading_options(group)
    group.add_argument("--allow-pickle", action="store_true",
                       help="allow .ckpt/.bin/.pt checkpoints in --models (pickles can run code)")
    group.add_argument("--compile", action="store_true",
                       help="compile each model's UNet and BrushNet when it loads (the first image of each size waits)")
    serve.set_defaults(func=cmd_serve)
    return serve


def cmd_serve(args) -> int:
    from ..options import UserError
    from .app import build_app, import_gradio, launch_options

    import_gradio()  # before any model work: a missing gradio is the first thing to report
    auth = parse_auth(args.auth)
    service = build_service(args)
    args.host = args.host.removeprefix("[").removesuffix("]")  # [::1], as in a URL, is the address ::1
    check_address(args.host, args.port)
    if args.host not in LOCAL_HOSTS:
        print(f"brushnet serve: warning: listening on {args.host}: anyone who can reach this machine on port "
              f"{args.port} can use it" + ("" if auth else "; protect it with --auth USER:PASS"), file=sys.stderr)
    _limit_decoded_pixels(service.limits.max_pixels)
    app = build_app(service)
    try:
        _, local_url, _ = app.launch(**launch_options(service, args.host, args.port, auth), prevent_thread_lock=True,
                                     quiet=True)
    except OSError as error:
        if "Cannot find empty port" in str(error):  # gradio's words for a port in use
            raise UserError(f"port {args.port} on {args.host} is already in use: choose another --port") from None
        raise UserError(f"cannot listen on {args.host}:{args.port} ({error}): choose another --host or --port") from None
    print(f"brushnet serve: {local_url} ({len(service.registry.names)} model(s); Ctrl+C stops the server)")
    # A service manager's SIGTERM stops it as Ctrl+C does: the server closes and the results folder goes.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    app.block_thread()
    return 0


def build_service(args):
    """The models, limits and device of the command line, every --models entry checked."""
    from ..arguments import check_number
    from ..options import UserError, check_scheduler, resolve_device, resolve_dtype, user_checked
    from .generation import GenerationService
    from .inputs import UploadLimits
    from .models import LoadOptions, ModelRegistry, check_model_entry, demo_entry, parse_model_entry
    from .selection import Selector, resolve_source

    user_checked(check_number, args.port, "--port", low=1, high=65535, integer=True)
    user_checked(check_number, args.max_pixels, "--max-pixels", low=1, integer=True)
    user_checked(check_number, args.max_upload_mb, "--max-upload-mb", low=0, low_inclusive=False, high=2**20)
    limits = UploadLimits(max_pixels=args.max_pixels, max_upload_bytes=max(1, int(args.max_upload_mb * 2**20)))
    configured = [parse_model_entry(text) for text in args.models]
    for entry in configured:
        check_model_entry(entry, allow_pickle=args.allow_pickle)
    demo = demo_entry()
    entries = configured + ([demo] if demo else [])
    device = resolve_device(args.device)
    check_scheduler(args.scheduler)
    options = LoadOptions(device=device, dtype=resolve_dtype(args.dtype, device), scheduler=args.scheduler,
                          offload=args.offload, allow_pickle=args.allow_pickle, compile=args.compile,
                          vae_tiling=args.vae_tiling)
    default = configured[0].name if configured else (demo.name if demo else None)
    if args.detector and not args.segmenter:
        raise UserError("--detector finds boxes that SAM turns into masks: give --segmenter too")
    segmenter = args.segmenter and user_checked(resolve_source, args.segmenter, "--segmenter", "sam")
    detector = args.detector and user_checked(resolve_source, args.detector, "--detector")
    return GenerationService(ModelRegistry(entries, options, default=default), limits,
                             selector=Selector(segmenter, detector, device))


def check_address(host: str, port: int) -> None:
    """A UserError naming the reason unless the server can listen on host:port: gradio reports every
    failure to bind (a host name that resolves to nothing, another machine's address, a port
    reserved for root) as a port in use."""
    import errno
    import socket

    from ..options import UserError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror:
        raise UserError(f"--host {host} is neither an IP address nor a host name that resolves: use 127.0.0.1 (this "
                        "machine only) or 0.0.0.0 (every network)") from None
    with socket.socket(family, kind, proto) as probe:
        # As the server binds: the lingering connections of a server just closed do not count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise UserError(f"port {port} on {host} is already in use: choose another --port") from None
            if error.errno == errno.EADDRNOTAVAIL:
                raise UserError(f"--host {host} is not an address of this machine: use 127.0.0.1 (this machine "
                                "only), 0.0.0.0 (every network) or one of this machine's own addresses") from None
            if error.errno == errno.EACCES:
                raise UserError(f"port {port} is reserved for the administrator (ports below 1024): choose "
                                "--port 1024 or above") from None
            raise UserError(f"cannot listen on {host}:{port} ({error.strerror or error}): choose another --host or "
                            "--port") from None


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        from ..options import UserError

        raise UserError("--auth must be USER:PASS, both non-empty (e.g. --auth alice:s3cret)")
    return user, password


def _limit_decoded_pixels(max_pixels: int) -> None:
    # gradio decodes the editor's images before our checks run: PIL's decompression-bomb guard then
    # refuses anything over twice the limit without allocating it (this process is the server's own).
    import PIL.Image

    PIL.Image.MAX_IMAGE_PIXELS = max_pixels
