"""Builds a TensorRT engine from the shipped ONNX model, cached by GPU model and TensorRT version.

A serialized engine only runs on the GPU model and TensorRT version that built it, so the cache
path names both, plus the ONNX file's sha256 and the precision:

    <cache>/<gpu-model>/trt-<version>/<onnx-sha256[:16]>-<fp16|fp32>.engine (+ .json beside it)

    python -m edge.tensorrt_engine --onnx /var/lib/binloop/models/binloop-waste/v3/model.onnx

TensorRT comes with JetPack on the Jetson (python3-libnvinfer); elsewhere this exits with the
reason instead of building.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from binloop.errors import ConfigError

DEVICE_TREE_MODEL = Path("/proc/device-tree/model")
DEFAULT_CACHE = Path("/var/lib/binloop/trt-engines")


def load_tensorrt() -> ModuleType:
    try:
        return importlib.import_module("tensorrt")
    except ImportError as exc:
        raise ConfigError(
            "TensorRT's Python API is not installed: on a Jetson it comes with JetPack "
            "(apt install python3-libnvinfer); the edge inferencer keeps using ONNX Runtime"
        ) from exc


def detect_gpu_model(device_tree: Path = DEVICE_TREE_MODEL) -> str:
    """The board name on a Jetson (its integrated GPU has no nvidia-smi), else nvidia-smi's."""
    if device_tree.exists():
        return device_tree.read_bytes().rstrip(b"\0").decode().strip()
    smi = shutil.which("nvidia-smi")
    if smi is None:
        raise ConfigError("no GPU found: neither a Jetson device tree nor nvidia-smi")
    result = subprocess.run(
        [smi, "--query-gpu=name", "--format=csv,noheader", "--id=0"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if result.returncode != 0 or not result.stdout.strip():
        raise ConfigError(f"nvidia-smi could not name the GPU: {result.stderr.strip()}")
    return result.stdout.strip().splitlines()[0]


def slug(text: str) -> str:
    """A path-safe token: "NVIDIA Jetson Orin Nano (8GB)" -> "nvidia-jetson-orin-nano-8gb"."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "unknown"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class EngineKey:
    onnx_sha256: str
    gpu_model: str
    tensorrt_version: str
    fp16: bool
    max_batch: int

    def path(self, cache_dir: Path) -> Path:
        precision = "fp16" if self.fp16 else "fp32"
        name = f"{self.onnx_sha256[:16]}-{precision}-b{self.max_batch}.engine"
        return cache_dir / slug(self.gpu_model) / f"trt-{slug(self.tensorrt_version)}" / name


def _write_atomically(path: Path, data: bytes) -> None:
    # The inferencer may look for the engine at any time: it must never see half a file.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_serialized_engine(
    trt: Any, onnx_path: Path, *, fp16: bool, max_batch: int, workspace_mb: int
) -> bytes:
    """ONNX -> serialized engine with the TensorRT builder; a dynamic batch gets a profile."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch; 8.x needs the flag.
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ConfigError(f"TensorRT cannot parse {onnx_path}: {'; '.join(errors)}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if fp16 and builder.platform_has_fast_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    dynamic = False
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        shape = list(tensor.shape)
        if shape and shape[0] == -1:
            dynamic = True
            rest = shape[1:]
            profile.set_shape(tensor.name, [1, *rest], [1, *rest], [max_batch, *rest])
    if dynamic:
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ConfigError(f"TensorRT could not build an engine from {onnx_path}")
    return bytes(serialized)


def ensure_engine(
    onnx_path: Path,
    cache_dir: Path = DEFAULT_CACHE,
    *,
    fp16: bool = True,
    max_batch: int = 1,
    workspace_mb: int = 1024,
    gpu_model: str | None = None,
    tensorrt: ModuleType | None = None,
) -> tuple[Path, bool]:
    """The cached engine for this ONNX file on this GPU and TensorRT; built when missing.

    Returns (path, built): built is False on a cache hit."""
    if not onnx_path.is_file():
        raise ConfigError(f"no ONNX model at {onnx_path}")
    trt = tensorrt or load_tensorrt()
    key = EngineKey(
        onnx_sha256=sha256_file(onnx_path),
        gpu_model=gpu_model or detect_gpu_model(),
        tensorrt_version=str(trt.__version__),
        fp16=fp16,
        max_batch=max_batch,
    )
    engine_path = key.path(cache_dir)
    if engine_path.is_file():
        return engine_path, False
    engine = build_serialized_engine(
        trt, onnx_path, fp16=fp16, max_batch=max_batch, workspace_mb=workspace_mb
    )
    _write_atomically(engine_path, engine)
    meta = {**asdict(key), "onnx_path": str(onnx_path), "engine_bytes": len(engine)}
    _write_atomically(engine_path.with_suffix(".json"), json.dumps(meta, indent=2).encode())
    return engine_path, True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build (or find) the TensorRT engine")
    parser.add_argument("--onnx", type=Path, required=True, help="the shipped model.onnx")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--fp32", action="store_true", help="do not allow FP16 kernels")
    parser.add_argument("--max-batch", type=int, default=1)
    parser.add_argument("--workspace-mb", type=int, default=1024)
    args = parser.parse_args(argv)
    try:
        path, built = ensure_engine(
            args.onnx,
            args.cache_dir,
            fp16=not args.fp32,
            max_batch=args.max_batch,
            workspace_mb=args.workspace_mb,
        )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{'built' if built else 'cached'}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
