"""Corrupted test sets on disk, in the official layouts, so one loader serves released and regenerated sets.

Layouts:
- "npy" (CIFAR-10-C / CIFAR-100-C): `<root>/<name>.npy`, uint8 (5N, H, W, C), rows (s-1)*N .. s*N-1 = severity s,
  plus `<root>/labels.npy` (5N,) = the labels repeated 5 times (uint8 when they fit, as released).
- "folder" (Tiny-ImageNet-C): `<root>/<name>/<severity>/<class dir>/<file>.JPEG`, written by PIL at quality 85
  with optimize=True (so every image, jpeg_compression included, is JPEG-encoded once more, as released).

Generation works in (corruption, severity) jobs. Each job draws from its own generator, seeded by
(seed, corruption, severity), so its output does not depend on job order, on worker count or on what already
exists. Each job's output appears atomically (written under a temporary name by a worker, renamed into place by
the calling process, which first tells `on_commit`: the provenance record lists a set before it exists), so an
interrupted run (Ctrl-C, a full disk, a kill) leaves finished sets and no temporary files, and resumes by skipping
finished jobs. In the npy layout a job's block goes to `<root>/parts/<name>_s<k>.npy` and the five blocks
are joined into `<name>.npy` once all exist; asking for some severities only leaves their blocks in `parts/`,
which the loader (`forde.data.corrupted_loader`) reads as well.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from forde.atomic import removed_on_failure
from forde.data.corruption_names import CORRUPTIONS, SEVERITIES, select
from forde.data.corruptions import corrupt, default_table
from forde.names import RULE, is_path_component
from forde.torch_internals import pool_processes

LAYOUTS = ("npy", "folder")
LABELS_FILE = "labels.npy"
PARTS_DIR = "parts"
JPEG_QUALITY = 85
GENERATOR_VERSION = 1  # recorded with every generated set; raise it whenever a change alters the generated pixels


def corruption_rng(seed: int, name: str, severity: int) -> np.random.Generator:
    """The generator one (corruption, severity) job draws from."""
    return np.random.default_rng([seed, CORRUPTIONS.index(name), severity])


@dataclass
class GenerationReport:
    out_dir: Path
    layout: str
    written: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[tuple[str, int]] = field(default_factory=list)  # already on disk
    assembled: list[str] = field(default_factory=list)  # npy files completed by this run
    seconds: float = 0.0


@dataclass(frozen=True)
class _Job:
    """Everything a worker needs to produce one (corruption, severity) output."""

    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray  # int64 [N]
    out_dir: Path
    table: str
    seed: int
    layout: str
    class_dirs: tuple[str, ...]
    file_names: tuple[str, ...]


def generate_corrupted_set(
    split_images,
    labels,
    out_dir,
    *,
    table: str | None = None,
    seed: int = 0,
    corruptions: Iterable[str] = CORRUPTIONS,
    severities: Iterable[int] = SEVERITIES,
    layout: str = "npy",
    progress: bool = True,
    class_dirs: Sequence[str] | None = None,
    file_names: Sequence[str] | None = None,
    workers: int | None = None,
    on_commit: Callable[[str, int], None] | None = None,
) -> GenerationReport:
    """Write a -C set for uint8 [N, C, H, W] images (torch or NumPy) and their labels; see the module docstring.

    `class_dirs[label]` and `file_names[i]` name the folder layout's paths (default: zero-padded class index and
    running index). `workers` processes share the jobs (default: CPU count; 1 runs in this process); they are
    spawned, so a calling script needs the usual `if __name__ == "__main__":` guard. `on_commit(name, severity)`
    is called just before each finished (corruption, severity) output is renamed into place.
    """
    started = time.perf_counter()
    job = _make_job(split_images, labels, out_dir, table, seed, layout, class_dirs, file_names)
    names = select(list(corruptions))
    severities = sorted(set(severities))
    if not set(severities) <= set(SEVERITIES):
        raise ValueError(f"severities must be among {SEVERITIES}, got {severities}")
    job.out_dir.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(job.out_dir)
    if layout == "npy":
        _prepare_npy(job, names)
    tasks = [(name, s) for name in names for s in severities]
    pending = [task for task in tasks if not _is_done(job, *task)]
    report = GenerationReport(job.out_dir, layout, written=pending, skipped=[t for t in tasks if t not in pending])
    try:
        _run_jobs(job, pending, workers or os.cpu_count() or 1, progress, len(report.skipped), on_commit)
    except BaseException:  # stopped or failed: only finished sets stay
        _remove_leftovers(job.out_dir)
        raise
    if layout == "npy":
        report.assembled = [name for name in names if _assemble_npy(job, name)]
    report.seconds = time.perf_counter() - started
    return report


def _make_job(split_images, labels, out_dir, table, seed, layout, class_dirs, file_names) -> _Job:
    images = np.asarray(split_images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 [N, C, H, W] images with C = 1 or 3, got {images.dtype} {images.shape}")
    images = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
    labels = np.asarray(labels).astype(np.int64)
    if labels.shape != (len(images),):
        raise ValueError(f"{len(images)} images but labels of shape {labels.shape}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    class_dirs = tuple(class_dirs) if class_dirs is not None else _numbered(n_classes, "")
    file_names = tuple(file_names) if file_names is not None else _numbered(len(images), ".JPEG")
    if len(class_dirs) < n_classes or len(file_names) != len(images):
        raise ValueError(f"need a class dir per class ({n_classes}) and a file name per image ({len(images)})")
    escaping = [n for n in (*class_dirs, *file_names) if not is_path_component(n)]
    if escaping:
        raise ValueError(f"class dir or file name {escaping[0]!r} {RULE}")
    return _Job(
        images, labels, Path(out_dir), table or default_table(images.shape[1]), seed, layout, class_dirs, file_names
    )


def _numbered(count: int, suffix: str) -> tuple[str, ...]:
    """Zero-padded indices, so that sorted order is index order (the loader sorts)."""
    width = len(str(max(count - 1, 0)))
    return tuple(f"{i:0{width}d}{suffix}" for i in range(count))


def _run_jobs(
    job: _Job,
    pending: list[tuple[str, int]],
    workers: int,
    progress: bool,
    done: int,
    on_commit: Callable[[str, int], None] | None,
) -> None:
    bar = tqdm(total=done + len(pending), initial=done, desc="corrupting", unit="job", disable=not progress)

    def commit(name: str, severity: int) -> None:
        if on_commit is not None:
            on_commit(name, severity)
        tmp, target = _output_paths(job, name, severity)
        os.replace(tmp, target)
        bar.set_postfix_str(f"{name} s{severity} done")
        bar.update()

    with bar:
        if min(workers, len(pending)) <= 1:
            for name, severity in pending:
                bar.set_postfix_str(f"{name} s{severity}")
                _run_job(job, name, severity)
                commit(name, severity)
            return
        # spawn, not fork: a forked child can inherit OpenCV's/OpenMP's thread-pool locks held and hang
        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(
            min(workers, len(pending)), mp_context=context, initializer=_init_worker, initargs=(job,)
        )
        try:
            futures = [pool.submit(_pool_job, name, severity) for name, severity in pending]
            for future in as_completed(futures):
                commit(*future.result())
        except BaseException:  # Ctrl-C, a full disk, a failed job: stop the other jobs now, not after them all
            _stop(pool)
            raise
        pool.shutdown()


def _stop(pool: ProcessPoolExecutor) -> None:
    """End a pool's workers at once. `shutdown` alone would wait for the jobs they are running (Python before
    3.14 has no `terminate_workers`); the workers ignore SIGINT, so only this process decides when they stop."""
    workers = pool_processes(pool)
    pool.shutdown(wait=False, cancel_futures=True)
    for process in workers:
        process.terminate()
    for process in workers:
        process.join(timeout=10)


_WORKER_JOB: list[_Job] = []  # set once per worker process, so the images are sent once, not per task


def _init_worker(job: _Job) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the caller stops the pool
    cv2.setNumThreads(1)  # the processes are the parallelism
    _WORKER_JOB.append(job)


def _pool_job(name: str, severity: int) -> tuple[str, int]:
    _run_job(_WORKER_JOB[0], name, severity)
    return name, severity


def _output_paths(job: _Job, name: str, severity: int) -> tuple[Path, Path]:
    """Where one job's output is written, and where it is renamed to when it is complete."""
    if job.layout == "npy":
        target = part_path(job.out_dir, name, severity)
        return target.with_name(target.name + ".tmp"), target
    target = job.out_dir / name / str(severity)
    return target.with_name(f".{target.name}.tmp"), target


def _run_job(job: _Job, name: str, severity: int) -> None:
    """Compute one (corruption, severity) and write it under its temporary name (committed by the caller)."""
    out = corrupt(job.images, name, severity, corruption_rng(job.seed, name, severity), job.table)
    tmp, target = _output_paths(job, name, severity)
    with removed_on_failure(tmp, target):
        if job.layout == "npy":
            _save_npy(tmp, out)
        else:
            _save_folder(job, out, tmp)


def _remove_leftovers(out_dir: Path) -> None:
    """Temporary files and folders of an interrupted run (every output is renamed into place when complete)."""
    for path in [
        *out_dir.glob("*.tmp"),
        *out_dir.glob(".*.tmp*"),
        *out_dir.glob(f"{PARTS_DIR}/*.tmp"),
        *out_dir.glob("*/.*.tmp"),
    ]:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def _is_done(job: _Job, name: str, severity: int) -> bool:
    if job.layout == "folder":
        return (job.out_dir / name / str(severity)).is_dir()
    return (job.out_dir / f"{name}.npy").is_file() or part_path(job.out_dir, name, severity).is_file()


# ---------------------------------------------------------------------------------------------- npy layout


def part_path(root: Path, name: str, severity: int) -> Path:
    """Where one severity block of the npy layout waits until all five exist."""
    return root / PARTS_DIR / f"{name}_s{severity}.npy"


def _prepare_npy(job: _Job, names: Sequence[str]) -> None:
    """Write labels.npy, or check that the folder holds this very set (same labels, same array shapes)."""
    n = len(job.labels)
    labels = np.tile(job.labels, len(SEVERITIES))
    if n and 0 <= labels.min() and labels.max() < 256:
        labels = labels.astype(np.uint8)
    path = job.out_dir / LABELS_FILE
    if not path.is_file():
        _save_npy_atomic(path, labels)
    elif not np.array_equal(np.load(path), labels):
        raise ValueError(f"{path} holds other labels: {job.out_dir} belongs to another set")
    expected = (len(SEVERITIES) * n,) + job.images.shape[1:]
    for name in names:
        full = job.out_dir / f"{name}.npy"
        if full.is_file() and (shape := np.load(full, mmap_mode="r").shape) != expected:
            raise ValueError(f"{full} has shape {shape}, expected {expected}")


def _save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.save(f, array)


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with removed_on_failure(tmp, path):
        _save_npy(tmp, array)
        os.replace(tmp, path)


def _assemble_npy(job: _Job, name: str) -> bool:
    """Join the five severity blocks into `<name>.npy` (atomically) once all exist; drop the blocks.

    Blocks next to an existing `<name>.npy` are left over from a run stopped while deleting them.
    """
    parts = [part_path(job.out_dir, name, s) for s in SEVERITIES]
    final = job.out_dir / f"{name}.npy"
    if final.is_file():
        _remove_parts(parts)
        return False
    if not all(p.is_file() for p in parts):
        return False
    blocks = [np.load(p, mmap_mode="r") for p in parts]
    tmp = final.with_name(final.name + ".tmp")
    shape = (sum(len(b) for b in blocks),) + blocks[0].shape[1:]
    with removed_on_failure(tmp, final):  # written in order, not through a memory map: a full disk is an OSError
        with open(tmp, "wb") as f:  # (a memory-mapped page that cannot be stored kills the process with SIGBUS)
            np.lib.format.write_array_header_1_0(
                f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
            )
            for block in blocks:
                f.write(np.ascontiguousarray(block, dtype=np.uint8).data)
        del blocks
        os.replace(tmp, final)
    _remove_parts(parts)
    return True


def _remove_parts(parts: list[Path]) -> None:
    for p in parts:
        p.unlink(missing_ok=True)
    if parts[0].parent.is_dir() and not any(parts[0].parent.iterdir()):
        parts[0].parent.rmdir()


# ---------------------------------------------------------------------------------------------- folder layout


def _save_folder(job: _Job, images: np.ndarray, tmp: Path) -> None:
    """One severity's JPEGs, in the folder `tmp` (a stale one was removed by _remove_leftovers)."""
    for label in np.unique(job.labels):
        (tmp / job.class_dirs[label]).mkdir(parents=True)
    for img, label, file_name in zip(images, job.labels, job.file_names):
        pixels = img[..., 0] if img.shape[-1] == 1 else img
        Image.fromarray(pixels).save(
            tmp / job.class_dirs[label] / file_name, format="JPEG", quality=JPEG_QUALITY, optimize=True
        )
