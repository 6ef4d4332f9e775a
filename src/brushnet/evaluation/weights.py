"""Weight files of the evaluation models: resolving, reading and strict loading.

Every scorer loads its weights explicitly from a file the user names. A file is given as

- a local path (`.safetensors`, or a PyTorch file such as `.pth` read with `weights_only=True`,
  which unpickles tensors and plain containers only, so it cannot run code), or
- `hf://OWNER/REPO/PATH/IN/REPO`: downloaded with `huggingface_hub.hf_hub_download` on a machine
  with the network (and found in the local cache offline, at once: `brushnet.hub`).

Nothing here downloads anything unless an `hf://` reference is given.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

HUB_PREFIX = "hf://"


def resolve_file(spec: str | os.PathLike, what: str) -> Path:
    """The local path of a weight file given as a path or an `hf://OWNER/REPO/FILE` reference.

    `what` names the file in error messages ("the LPIPS heads file")."""
    text = str(spec)
    if text.startswith(HUB_PREFIX):
        parts = text[len(HUB_PREFIX):].split("/")
        if len(parts) < 3 or not all(parts):
            raise ValueError(f"{what} {text!r} is not a hub reference of the form hf://OWNER/REPO/PATH/IN/REPO.")
        from huggingface_hub import hf_hub_download

        from ..hub import local_only_if_unreachable

        try:
            # Without a network: the cached copy at once, or one line at once, not half a minute of retries.
            return Path(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]), **local_only_if_unreachable({})))
        except Exception as error:  # offline, missing repo/file, no permission: all one message
            raise ValueError(f"Could not get {what} {text} from the Hugging Face Hub "
                             f"({_first_line(error)}): download it and pass its local path.") from None
    path = Path(text).expanduser()
    if not path.exists():
        raise ValueError(f"{what} {path} does not exist: pass the path of the downloaded file.")
    if not path.is_file():
        raise ValueError(f"{what} {path} is a folder, not a weights file.")
    return path


def pretrained_source(path: Path, text: str) -> tuple[str, dict]:
    """What a transformers `from_pretrained` is given for a model or tokenizer named `text` (`path`:
    it expanded): the local folder when it exists, else the hub id, with local_files_only when the
    hub cannot be reached, so the cached copy loads at once instead of after half a minute of retries."""
    from ..hub import local_only_if_unreachable

    if path.is_file():  # transformers would take it for a hub id and try the network for half a minute
        raise ValueError(f"{text} is a file: pass the model's folder (config.json, weights, tokenizer files) "
                         "or a hub id.")
    if path.exists():
        return str(path), {}
    return text, local_only_if_unreachable({})


def check_tokenizer_folder(path: Path, text: str) -> None:
    """A local folder must hold CLIP's tokenizer files: without them transformers builds a tokenizer of
    two tokens, and every caption scores as unknown words (plausible, meaningless numbers)."""
    if path.is_dir() and not (path / "tokenizer.json").is_file() and not (
            (path / "vocab.json").is_file() and (path / "merges.txt").is_file()):
        raise ValueError(f"{text} has no CLIP tokenizer files (vocab.json and merges.txt, or tokenizer.json): "
                         "copy them from the model's release into it.")


def read_state_dict(spec: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a weight file (see the module docstring for what `spec` may be)."""
    path = resolve_file(spec, what)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded = load_file(str(path))
        else:
            with open(path, "rb") as f:
                head = f.read(4)
            if head != b"PK\x03\x04" and head[:1] != b"\x80":  # torch would say only "(101)", a byte's value
                raise ValueError("neither a torch.save zip archive nor a pickle: a .pth/.pt file of tensors, or "
                                 ".safetensors")
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt file, a pickle holding code, an unknown format
        raise ValueError(f"{what} {path} could not be read as a weights file ({_first_line(error)}).") from None
    # Some checkpoints wrap their weights: {"state_dict": {...}}.
    while isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ValueError(f"{what} {path} does not hold a state dict of tensors.")
    return dict(loaded)


def load_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], what: str,
                optional: Iterable[str] = ()) -> None:
    """Load `state_dict` into `module`; every key must match in name and shape.

    Keys in `optional` may be present in the file (and are then ignored) or absent: e.g. the
    ImageNet classifier that torchvision's SqueezeNet file carries but LPIPS does not use.
    Raises ValueError naming the first missing, unexpected or mis-shaped keys.
    """
    optional = set(optional)
    state_dict = {k: v for k, v in state_dict.items() if k not in optional}
    check_keys({k: tuple(v.shape) for k, v in module.state_dict().items()}, state_dict, what)
    module.load_state_dict(state_dict, strict=True)


def check_keys(expected: Mapping[str, tuple], state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise ValueError unless `state_dict` has exactly the `expected` keys with those shapes."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        details = []
        if missing:
            details.append(f"missing {len(missing)} key(s) such as {', '.join(missing[:3])}")
        if unexpected:
            details.append(f"unexpected {len(unexpected)} key(s) such as {', '.join(unexpected[:3])}")
        raise ValueError(f"{what} does not fit the model ({'; '.join(details)}): pass the right file.")
    wrong = [f"{k} {tuple(v.shape)} (expected {tuple(expected[k])})"
             for k, v in state_dict.items() if tuple(v.shape) != tuple(expected[k])]
    if wrong:
        raise ValueError(f"{what} does not fit the model: {len(wrong)} tensor(s) of the wrong shape, "
                         f"such as {', '.join(wrong[:2])}.")


def assign_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], what: str,
                      dtype=torch.float32) -> torch.nn.Module:
    """Give a model built on the meta device the tensors of `state_dict` (checked strictly, floats
    cast to `dtype`), rebuild its non-persistent `position_ids` buffers, and return it frozen in eval
    mode. Nothing is randomly initialised first, and nothing may be left on the meta device."""
    check_keys({k: tuple(v.shape) for k, v in model.state_dict().items()}, state_dict, what)
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()},
                          strict=True, assign=True)
    for name, module in model.named_modules():
        for buffer_name, buffer in list(module.named_buffers(recurse=False)):
            if not buffer.is_meta:
                continue
            if buffer_name != "position_ids":
                raise RuntimeError(f"Unexpected uninitialised buffer {name}.{buffer_name} in {what}.")
            module.register_buffer(buffer_name, torch.arange(buffer.shape[-1]).expand(buffer.shape).clone(),
                                   persistent=False)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"Tensors of {what} left uninitialised: {', '.join(left[:3])}.")
    return model.eval().requires_grad_(False)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
