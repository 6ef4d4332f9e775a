"""A folder laid out as huggingface_hub's cache holds a downloaded repo, for loading hub ids offline."""

import shutil
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def put_in_hub_cache(cache: Path, repo_id: str, folder: Path) -> Path:
    """Copy `folder` into `cache` as the snapshot of model repo `repo_id` at main; returns the snapshot."""
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return Path(shutil.copytree(folder, repo / "snapshots" / COMMIT))
