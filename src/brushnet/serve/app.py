"""The page of `brushnet serve`: a gradio Blocks app over `GenerationService`.

Endpoints a client may call (`gradio_client`, see README "Web UI"): `/inpaint` and `/outpaint`.
Both run in gradio's queue under one concurrency id with a limit of 1, so one generation runs at a
time on the device and the others wait, seeing their place in the queue; selections by click or
words (SAM) wait in the same queue. The preview, the selection, the seed dice, Cancel, the task
picker's visibility and the parameter view are private helpers of the page.
"""

import html
import logging
import os
from types import SimpleNamespace

from ..regions import outpaint_canvas
from ..segmentation.defaults import BOX_THRESHOLD
from .generation import Cancelled, GenerationService, user_message
from .inputs import (
    DEFAULT_TASK,
    MAX_BLEND_KERNEL,
    MAX_IMAGES,
    MAX_OUTPAINT_SIDE,
    MAX_STEPS,
    RANDOM_SEED,
    TASK_LABELS,
    InputError,
    build_mask,
    check_pixels,
    combine_mask,
    editor_erased,
    editor_image,
    editor_strokes,
    generation_settings,
    mask_image,
    open_uploaded_image,
    open_uploaded_mask,
    outpaint_sides,
    powerpaint_task,
    random_seed,
    unreadable_upload,
)
from .selection import Selection, click_pixel, page_preview, selection_strokes, with_point, with_words

DEVICE_QUEUE = "device"  # the one concurrency id of every generation: they share the device
QUEUE_SIZE = 64  # requests waiting beyond this are refused ("queue is full") instead of piling up
INSTALL_HINT = 'the web UI needs gradio: install it with pip install "brushnet[serve]"'
# The preview and mask of a small image (the demo model's 64x64 scenes) fill their box, sharp.
CSS = ("#preview img, #mask-upload img { width: 100%; height: 100%; object-fit: contain; "
       "image-rendering: pixelated; } #preview img { cursor: crosshair; }")
INTRO = (
    "Upload an image, paint over what to replace (**brush**; the **eraser** takes paint away; both have a size "
    "slider), click the object in the masked image or name it (with `--segmenter`), or upload a mask (white = "
    "fill). Describe what to paint, then **Inpaint**. Results keep their parameters: the gallery's download gives "
    "a PNG that `brushnet info` reads."
)
SELECTION_HELP = ("Click the masked image to select the object under the click (SAM); each click refines it, "
                  "and a click with *Negative points* ticked takes a part away. The brush adds to the selection; "
                  "the eraser takes away what the brush painted.")


def import_gradio():
    """gradio, imported only when the UI is built, with its usage analytics off."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        import gradio
    except ImportError:
        from ..options import UserError

        raise UserError(INSTALL_HINT) from None
    return gradio


def build_app(service: GenerationService):
    """The Blocks app of `service`, queued (one generation at a time), not yet launched."""
    gr = import_gradio()
    guard = lambda component, what: _guarded(gr, component, what, service.limits)  # noqa: E731
    with gr.Blocks(title="BrushNet", analytics_enabled=False, delete_cache=(3600, 86400)) as app:
        page = _layout(gr, guard, service)
        _connect(gr, service, page)
    app.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
    return app


def launch_options(service: GenerationService, host: str, port: int, auth: tuple[str, str] | None) -> dict:
    """`app.launch` keywords: local-only features off, nothing fetched from the internet."""
    # gradio writes the server's own URL as http://HOST:PORT/: an IPv6 address needs its brackets
    # there (it strips them to listen), else it fails with an invalid port.
    server_name = f"[{host}]" if ":" in host else host
    return {"server_name": server_name, "server_port": port, "auth": auth,
            "max_file_size": service.limits.max_upload_bytes,
            "show_error": True, "share": False, "ssr_mode": False, "pwa": False, "mcp_server": False,
            "enable_monitoring": False, "run_history": False, "footer_links": ["api"], "css": CSS}


# -- layout -----------------------------------------------------------------------------------

def _guarded(gr, component, what: str, limits):
    """`component` (an instance) whose failures to decode an upload reach the page as one sentence;
    gradio's own message spans lines and shows the server's temporary file paths. (A subclass would
    do as well, but gradio writes a .pyi stub beside the module of every component class defined.)"""
    preprocess = component.preprocess

    def guarded(payload):
        try:
            return preprocess(payload)
        except gr.Error:
            raise
        except Exception as error:  # noqa: BLE001 - PIL raises many types for a damaged or hostile file
            raise gr.Error(unreadable_upload(error, what, limits), print_exception=False) from None

    component.preprocess = guarded
    return component


def _layout(gr, guard, service: GenerationService) -> SimpleNamespace:
    registry = service.registry
    page = SimpleNamespace()
    gr.Markdown("## BrushNet inpainting\n" + INTRO)
    with gr.Row():
        with gr.Column(scale=3):
            page.model = gr.Dropdown(registry.names, value=registry.default, label="Model", elem_id="model")
            powerpaint = registry.entry(registry.default).powerpaint
            page.task = gr.Radio([(label, task) for task, label in TASK_LABELS.items()], value=DEFAULT_TASK,
                                 label="PowerPaint task (the Outpaint tab always outpaints)", visible=powerpaint,
                                 elem_id="task")
            page.fitting_degree = gr.Slider(0, 1, value=1.0, step=0.05, visible=False, elem_id="fitting-degree",
                                            label="Fitting degree (how closely the object follows the mask's shape)")
            page.prompt = gr.Textbox(label="Prompt", placeholder="what to paint in the hole", elem_id="prompt")
            page.negative_prompt = gr.Textbox("", label="Negative prompt", placeholder="what to avoid",
                                              elem_id="negative-prompt")
            with gr.Tabs():
                with gr.Tab("Inpaint", id="inpaint"):
                    _inpaint_tab(gr, guard, page, service)
                with gr.Tab("Outpaint", id="outpaint"):
                    _outpaint_tab(gr, guard, page)
            with gr.Accordion("Settings", open=True):
                _settings(gr, page)
        with gr.Column(scale=2):
            page.gallery = gr.Gallery(label="Results (click one for its parameters)", elem_id="results", columns=2,
                                      format="png", buttons=["download", "fullscreen"], interactive=False)
            page.cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
            page.params = gr.JSON(label="Parameters", elem_id="params")
            page.params_list = gr.State([])
    return page


def _inpaint_tab(gr, guard, page, service) -> None:
    with gr.Row():
        page.editor = guard(gr.ImageEditor(
            label="Image (upload, then paint the hole)", type="pil", sources=["upload", "clipboard"],
            # No crop or resize: the painted layer must keep the image's own pixel grid.
            transforms=[], layers=False, format="png", elem_id="editor", scale=3,
            brush=gr.Brush(colors=[("#ff00ff", 0.6)], color_mode="fixed"), eraser=gr.Eraser(),
        ), "image")
        with gr.Column(scale=2):
            page.preview = gr.Image(label="Masked image (magenta = to fill; click to select)", interactive=False,
                                    format="png", height=240, elem_id="preview")
            _selection_controls(gr, page, service)
            page.mask = guard(gr.Image(label="Or upload a mask (white = fill)", type="filepath", image_mode=None,
                                       sources=["upload"], height=200, elem_id="mask-upload"), "mask")
            page.invert = gr.Checkbox(label="Invert the mask (fill what is not painted)", elem_id="invert")
    page.inpaint_button = gr.Button("Inpaint", variant="primary", elem_id="inpaint-button")


def _selection_controls(gr, page, service) -> None:
    selector = service.selector
    page.selection = gr.State(None)
    with gr.Accordion("Select without painting", open=selector.segmenter_source is not None):
        gr.Markdown(SELECTION_HELP if selector.segmenter_source else
                    "Start the server with `--segmenter` (SAM) to select objects by clicking, and `--detector` to "
                    "select them by name.")
        page.negative = gr.Checkbox(label="Negative points (a click marks what is not part of the object)",
                                    elem_id="negative-points")
        with gr.Row():
            page.words = gr.Textbox(label="Or name what to select", placeholder="a dog. a cat", scale=3,
                                    elem_id="select-words")
            page.threshold = gr.Slider(0.05, 1, value=BOX_THRESHOLD, step=0.05, label="Word threshold",
                                       scale=1)
        with gr.Row():
            page.select_button = gr.Button("Select", elem_id="select-button")
            page.clear_selection = gr.Button("Clear selection", elem_id="clear-selection")


def _outpaint_tab(gr, guard, page) -> None:
    page.outpaint_image = guard(gr.Image(label="Image to extend", type="filepath", image_mode=None,
                                         sources=["upload"], elem_id="outpaint-image"), "image")
    with gr.Row():
        # No minimum, maximum or precision here: gradio's own refusal names no field ("Value -8 is less
        # than minimum value 0") and its rounding hides a fraction; outpaint_sides says which side.
        page.sides = [gr.Number(0, label=f"{side} (px, 0 to {MAX_OUTPAINT_SIDE})", elem_id=f"outpaint-{side}")
                      for side in ("left", "right", "top", "bottom")]
    page.outpaint_button = gr.Button("Outpaint", variant="primary", elem_id="outpaint-button")


def _settings(gr, page) -> None:
    with gr.Row():
        page.steps = gr.Slider(1, MAX_STEPS, value=50, step=1, label="Steps", elem_id="steps")
        page.guidance = gr.Slider(0, 20, value=7.5, step=0.5, label="Guidance")
        page.scale = gr.Slider(0, 2, value=1.0, step=0.05, label="Conditioning scale")
    with gr.Row():
        page.start = gr.Slider(0, 1, value=0.0, step=0.05, label="BrushNet from (fraction of the steps)")
        page.end = gr.Slider(0, 1, value=1.0, step=0.05, label="BrushNet until")
    with gr.Row():
        page.seed = gr.Number(RANDOM_SEED, label="Seed (-1: random)", elem_id="seed")  # checked by generation_settings
        page.dice = gr.Button("Random seed", elem_id="dice")
        page.num_images = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="Images")
    with gr.Row():
        page.blend = gr.Checkbox(True, label="Blend into the original (keeps every pixel away from the hole)",
                                 elem_id="blend")
        page.blend_kernel = gr.Slider(0, MAX_BLEND_KERNEL, value=0, step=1,
                                      label="Blend kernel (odd px; 0: the model's default)")
        page.crop_to_mask = gr.Checkbox(False, label="Crop to the mask (large photos: work around the hole only)")
    page.strength = gr.Slider(0.01, 1, value=1.0, step=0.01, elem_id="strength",
                              label="Strength (below 1: start from the image noised this far, keeping its colours)")


# -- events -----------------------------------------------------------------------------------

def _connect(gr, service: GenerationService, page) -> None:
    handlers = _handlers(gr, service)
    settings = [page.model, page.negative_prompt, page.steps, page.guidance, page.scale, page.start, page.end,
                page.seed, page.blend, page.blend_kernel, page.num_images, page.crop_to_mask, page.strength]
    outputs = [page.gallery, page.params, page.params_list]
    queued = {"concurrency_id": DEVICE_QUEUE, "concurrency_limit": 1}
    inpaint = page.inpaint_button.click(handlers.inpaint, [page.editor, page.prompt, page.mask, page.invert, *settings,
                                                           page.task, page.fitting_degree, page.selection],
                                        outputs, api_name="inpaint", **queued)
    outpaint = page.outpaint_button.click(handlers.outpaint, [page.outpaint_image, page.prompt, *page.sides, *settings],
                                          outputs, api_name="outpaint", **queued)
    helper = {"queue": False, "api_visibility": "private", "show_progress": "hidden"}
    page.cancel.click(handlers.cancel, None, None, cancels=[inpaint, outpaint], **helper)
    # Queued (with no limit, beside the device queue): an unqueued event's gr.Warning never reaches
    # the page, and the preview is where a mask of the wrong size or an unreadable one is first told.
    previewing = {"concurrency_id": "preview", "concurrency_limit": None, "api_visibility": "private",
                  "show_progress": "hidden"}
    for change in (page.editor.change, page.mask.change, page.invert.change):
        change(handlers.preview, [page.editor, page.mask, page.invert, page.selection], page.preview, **previewing)
    page.dice.click(random_seed, None, page.seed, **helper)
    page.model.change(handlers.model_changed, page.model, [page.task, page.fitting_degree], **helper)
    page.task.change(handlers.task_changed, [page.task, page.model], page.fitting_degree, **helper)

    # A selection runs SAM on the device: it queues with the generations.
    selecting = {"concurrency_id": DEVICE_QUEUE, "concurrency_limit": 1, "api_visibility": "private",
                 "show_progress": "minimal"}
    shown = [page.editor, page.mask, page.invert]
    updated = [page.selection, page.preview]
    page.preview.select(handlers.select_click, [*shown, page.selection, page.negative], updated, **selecting)
    for event in (page.select_button.click, page.words.submit):
        event(handlers.select_words, [*shown, page.selection, page.words, page.threshold], updated, **selecting)
    page.clear_selection.click(handlers.new_image, shown, updated, **helper)
    # A new image starts a new selection. Its preview is made here too: the change event of an
    # upload can come before the upload is complete, and then finds no image.
    page.editor.upload(handlers.new_image, [page.editor, page.mask, page.invert], [page.selection, page.preview],
                       **previewing)
    page.editor.clear(lambda: None, None, page.selection, **helper)
    page.gallery.select(handlers.show_params, page.params_list, page.params, **helper)


def _handlers(gr, service: GenerationService) -> SimpleNamespace:
    limits, registry = service.limits, service.registry

    def refuse(error: BaseException):
        """A failure of a page helper, as one sentence in the page."""
        raise gr.Error(html.escape(user_message(error), quote=False), print_exception=False) from None

    def respond(generate):
        """The outputs for `generate()`'s results; a mistake or failure is shown in the page and the
        server carries on with the next request. The library's notices for the user (a prompt
        longer than the text encoder reads) are shown in the page too, not only in the server's log."""
        notices = _Notices()
        library = logging.getLogger("brushnet.inpaint")
        library.addHandler(notices)
        try:
            results = generate()
        except Cancelled:
            gr.Info("Cancelled.")
            return gr.skip(), gr.skip(), gr.skip()  # the page keeps what it showed
        except gr.Error:
            raise
        except Exception as error:  # noqa: BLE001 - any failure becomes a message; the server keeps serving
            raise gr.Error(html.escape(user_message(error), quote=False), print_exception=False) from None
        finally:
            library.removeHandler(notices)
        for message in notices.messages:
            gr.Warning(html.escape(message, quote=False))
        gallery = [(str(result.path), result.caption) for result in results]
        params = [result.params for result in results]
        return gallery, params, params

    # Parameters with a default are optional for API clients (the page's initial values apply);
    # gradio finds its progress tracker by a gr.Progress() default.
    def inpaint(image, prompt, mask=None, invert_mask=None, model=None, negative_prompt=None, steps=None,
                guidance=None, scale=None, start=None, end=None, seed=None, blend=None, blend_kernel=None,
                num_images=None, crop_to_mask=None, strength=None, task=None, fitting_degree=None, selection=None,
                request: gr.Request = None, progress=gr.Progress()):  # noqa: B008
        def generate():
            keywords = powerpaint_task(task, fitting_degree, registry.entry(model).powerpaint, model)
            picture = editor_image(image, limits)
            uploaded = open_uploaded_mask(mask, limits) if mask else None
            strokes = selection_strokes(editor_strokes(image, picture.size), selection)
            hole = build_mask(picture.size, strokes, uploaded, bool(invert_mask), editor_erased(image))
            settings = generation_settings(prompt, negative_prompt, steps, guidance, scale, start, end, seed,
                                           num_images, blend, blend_kernel, crop_to_mask, strength, keywords)
            return service.run(model, picture, hole, settings, _session(request), progress, extra_params=keywords)

        return respond(generate)

    def outpaint(image, prompt, left=None, right=None, top=None, bottom=None, model=None, negative_prompt=None,
                 steps=None, guidance=None, scale=None, start=None, end=None, seed=None, blend=None,
                 blend_kernel=None, num_images=None, crop_to_mask=None, strength=None, request: gr.Request = None,
                 progress=gr.Progress()):  # noqa: B008
        def generate():
            # PowerPaint extends the canvas with its outpainting task, from the surroundings alone.
            powerpaint = registry.entry(model).powerpaint
            keywords = powerpaint_task("outpainting" if powerpaint else None, None, powerpaint, model)
            if not image:
                raise InputError("No image: upload the image to extend first.")
            sides = outpaint_sides(left, right, top, bottom)
            picture = open_uploaded_image(image, limits)
            extended = (picture.width + sides["left"] + sides["right"], picture.height + sides["top"] + sides["bottom"])
            check_pixels(extended, limits, "extended image")
            canvas, hole = outpaint_canvas(picture, **sides)
            settings = generation_settings(prompt, negative_prompt, steps, guidance, scale, start, end, seed,
                                           num_images, blend, blend_kernel, crop_to_mask, strength, keywords)
            return service.run(model, canvas, hole, settings, _session(request), progress,
                               extra_params={**keywords, "outpaint": sides})

        return respond(generate)

    def preview(image, mask, invert_mask, selection=None):
        if not image or image.get("background") is None:
            return None
        try:
            picture = editor_image(image, limits)
            uploaded = open_uploaded_mask(mask, limits) if mask else None
            strokes = selection_strokes(editor_strokes(image, picture.size), selection)
            hole = combine_mask(picture.size, strokes, uploaded, bool(invert_mask), editor_erased(image))
        except (ValueError, FileNotFoundError) as error:  # InputError, or a mask file PIL cannot read
            gr.Warning(html.escape(str(error), quote=False))
            return None
        return page_preview(picture, mask_image(hole), selection)

    def new_image(image, mask, invert_mask):
        return None, preview(image, mask, invert_mask)

    def selected(image, mask, invert_mask, selection: Selection, progress):
        """The selection with its mask made by SAM, and the preview showing it."""
        if not image or image.get("background") is None:
            raise gr.Error("No image: upload one in the image box first.", print_exception=False)
        try:
            picture = editor_image(image, limits)
            selection.mask = service.select(picture, selection, progress) if not selection.empty else None
        except Exception as error:  # noqa: BLE001 - a mistake or a failure: one sentence, the page keeps its state
            refuse(error)
        return selection, preview(image, mask, invert_mask, selection)

    def select_click(image, mask, invert_mask, selection, negative, event: gr.SelectData,
                     progress=gr.Progress()):  # noqa: B008
        if not image or image.get("background") is None:
            raise gr.Error("No image: upload one in the image box first.", print_exception=False)
        try:
            point = click_pixel(event.index, image["background"].size)
        except InputError as error:
            refuse(error)
        return selected(image, mask, invert_mask, with_point(selection, point, bool(negative)), progress)

    def select_words(image, mask, invert_mask, selection, words, threshold, progress=gr.Progress()):  # noqa: B008
        return selected(image, mask, invert_mask, with_words(selection, words, threshold), progress)

    def model_changed(model):
        powerpaint = model in registry.entries and registry.entry(model).powerpaint
        # A BrushNet does text-guided inpainting only: a task picked for PowerPaint must not linger, hidden.
        return (gr.update(visible=powerpaint, value=DEFAULT_TASK), gr.update(visible=False))

    def task_changed(task, model):
        powerpaint = model in registry.entries and registry.entry(model).powerpaint
        return gr.update(visible=powerpaint and task == "shape-guided")

    def cancel(request: gr.Request):
        service.request_cancel(_session(request))

    def show_params(params_list, event: gr.SelectData):
        index = event.index if isinstance(event.index, int) else 0
        return params_list[index] if 0 <= index < len(params_list) else None

    return SimpleNamespace(inpaint=inpaint, outpaint=outpaint, preview=preview, cancel=cancel,
                           show_params=show_params, new_image=new_image, select_click=select_click,
                           select_words=select_words, model_changed=model_changed, task_changed=task_changed)


class _Notices(logging.Handler):
    """The warnings one generation logs (one generation runs at a time: the device queue's limit is 1)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record) -> None:
        self.messages.append(record.getMessage())


def _session(request) -> str:
    return getattr(request, "session_hash", None) or ""
