"""Nothing outside the output is ever touched: a folder of the output that is a symbolic link
(to a scratch disk, a home folder...) is refused before any work, and no code path writes,
moves or deletes through one or removes a name docpipe did not give (pipeline/dataset/store.py
`check_contained` and `_guard`, commit.py `_fence_stages`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pipeline.cli import EXIT_BAD_CONFIG, main
from pipeline.dataset import Dataset, OutputUnsafe
from tests.docs_factory import make_pdf

# Every folder docpipe writes in, moves files between or removes files from ("<gen>" is the
# staging folder of the lease generation the finished output was written under).
FOLDERS = (
    "documents", "pages", "runs", "_docpipe", "_docpipe/lease", "_docpipe/plans", "_docpipe/staging",
    "_docpipe/staging/<gen>", "_docpipe/staging/<gen>/pages", "_docpipe/fenced", "_docpipe/quarantine",
    "_docpipe/compactions", "_docpipe/reports",
)
COMMANDS = ("run", "verify --repair", "compact", "verify")


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A source of two PDFs and an output one run finished (shared: cases copy it)."""
    base = tmp_path_factory.mktemp("contained")
    src = base / "src"
    src.mkdir()
    make_pdf(src / "a.pdf", 1)
    make_pdf(src / "b.pdf", 2)
    out = base / "out"
    assert main(["run", str(src), "--output", str(out), "--no-progress", "--prep-workers", "0",
                 "--shard-size", "1"]) == 0
    return src, out


def _decoys(folder: Path) -> None:
    """What a scratch disk or a home folder might hold, with names docpipe gives its own files."""
    (folder / ".ssh").mkdir(parents=True)
    (folder / ".ssh" / "id_ed25519").write_bytes(b"-----BEGIN OPENSSH PRIVATE KEY-----\n")
    for gen in ("g000000000001", "g000000000002", "nolease", "g000000000001-0123abcd"):
        for table in ("pages", "documents"):
            (folder / gen / table).mkdir(parents=True)
            (folder / gen / table / "part-decoy.parquet").write_bytes(b"not a parquet file")
    (folder / "part-decoy.parquet").write_bytes(b"someone's data")
    (folder / "000000000009.json").write_text('{"run_id": "x"}')
    temp = folder / ".part-decoy.parquet.tmp-0123"
    temp.write_bytes(b"old temp-like file")
    os.utime(temp, (1, 1))  # "older than the TTL"
    (folder / "notes.txt").write_text("keep me")


def snapshot(folder: Path) -> dict[str, object]:
    """Every path under `folder` with its bytes (files) or link target (links)."""
    out: dict[str, object] = {}
    for dirpath, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(dirpath) / name
            rel = str(path.relative_to(folder))
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
            elif path.is_file():
                out[rel] = path.read_bytes()
            else:
                out[rel] = "dir"
    return out


def _link_folder(out: Path, rel: str, scratch: Path) -> None:
    """Make `out/rel` a symbolic link to `scratch` (which gets what the folder held, and decoys)."""
    folder = out / rel
    folder.parent.mkdir(parents=True, exist_ok=True)
    _decoys(scratch)
    if folder.exists():
        for item in folder.iterdir():
            shutil.move(str(item), scratch / f"moved-{item.name}")
        folder.rmdir()
    folder.symlink_to(scratch, target_is_directory=True)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("folder", FOLDERS)
def test_a_symlinked_folder_is_refused_and_its_target_untouched(
    finished: tuple[Path, Path], tmp_path: Path, folder: str, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    src, base_out = finished
    out = tmp_path / "out"
    shutil.copytree(base_out, out, symlinks=True)
    gen = sorted(p.name for p in (out / "_docpipe" / "staging").iterdir())[-1]
    scratch = tmp_path / "scratch"
    _link_folder(out, folder.replace("<gen>", gen), scratch)
    before = snapshot(scratch)
    argv = {
        "run": ["run", str(src), "--output", str(out), "--no-progress", "--prep-workers", "0"],
        "verify --repair": ["verify", str(out), "--repair"],
        "verify": ["verify", str(out)],
        "compact": ["compact", str(out)],
    }[command]
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert snapshot(scratch) == before  # byte for byte, nothing added, moved or removed
    assert code == EXIT_BAD_CONFIG, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "symbolic link" in lines[0] and "Traceback" not in err
    assert folder.replace("<gen>", gen) in lines[0]


def test_the_output_root_itself_may_be_a_link(finished: tuple[Path, Path], tmp_path: Path) -> None:
    src, base_out = finished
    real = tmp_path / "disk" / "out"
    shutil.copytree(base_out, real, symlinks=True)
    link = tmp_path / "out"
    link.symlink_to(real, target_is_directory=True)
    assert main(["run", str(src), "--output", str(link), "--no-progress", "--prep-workers", "0"]) == 0
    assert main(["verify", str(link), "--repair"]) == 0


# ---- without the up-front check: never through a link, only docpipe's own names ------------


def _held(out: Path) -> tuple[Dataset, object]:
    dataset = Dataset(str(out))
    return dataset, dataset.acquire("test-run")


def test_fencing_touches_only_docpipes_own_names(finished: tuple[Path, Path], tmp_path: Path) -> None:
    _src, base_out = finished
    out = tmp_path / "out"
    shutil.copytree(base_out, out, symlinks=True)
    staging = out / "_docpipe" / "staging"
    (staging / ".ssh").mkdir()
    (staging / ".ssh" / "id").write_text("key")
    (staging / "notes").mkdir()
    (staging / "notes" / "part-x.parquet").write_text("not docpipe's")
    old = staging / "g000000000000"  # an older generation: fenced and emptied
    (old / "pages").mkdir(parents=True)
    (old / "documents").mkdir()
    (old / "pages" / "part-abc.parquet").write_bytes(b"staged, never committed")
    (old / "pages" / "readme.txt").write_text("someone put this here")
    fenced = out / "_docpipe" / "fenced"
    fenced.mkdir(exist_ok=True)
    (fenced / "scratch").mkdir()
    (fenced / "scratch" / "big.bin").write_bytes(b"x")
    dataset, lease = _held(out)
    with lease:
        dataset.clean(generation=lease.generation)
    assert (staging / ".ssh" / "id").read_text() == "key"
    assert (staging / "notes" / "part-x.parquet").exists()
    assert (fenced / "scratch" / "big.bin").exists()
    kept = [p for p in fenced.rglob("readme.txt")]
    assert len(kept) == 1 and kept[0].read_text() == "someone put this here"  # its folder stays for it
    assert not list(fenced.rglob("part-abc.parquet"))  # docpipe's own staged file went
    assert main(["verify", str(out)]) == 0


def test_a_link_that_appears_after_the_check_is_never_followed(finished: tuple[Path, Path], tmp_path: Path) -> None:
    _src, base_out = finished
    out = tmp_path / "out"
    shutil.copytree(base_out, out, symlinks=True)
    dataset, lease = _held(out)
    scratch = tmp_path / "scratch"
    with lease:
        _link_folder(out, "_docpipe/staging/g000000000000", scratch)  # an "older generation", swapped in late
        before = snapshot(scratch)
        dataset.clean(generation=lease.generation)  # a link is not a staging folder: not walked into
        assert (out / "_docpipe" / "staging" / "g000000000000").is_symlink()
        _link_folder(out, "_docpipe/quarantine", tmp_path / "scratch2")
        before2 = snapshot(tmp_path / "scratch2")
        victim = next((out / "pages").glob("part-*.parquet"))
        victim.write_bytes(b"damaged")
        with pytest.raises(OutputUnsafe):
            dataset.verify(repair=True)
    assert snapshot(scratch) == before
    assert snapshot(tmp_path / "scratch2") == before2
    assert victim.read_bytes() == b"damaged"  # not moved into the link's target
