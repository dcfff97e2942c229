"""Router models: an ONNX file checked before use, run with onnxruntime on one thread.

The contract a model file must meet (``mesh router train`` and ``scripts/make_default_router.py``
produce it; ``OnnxModel.load`` checks it and refuses anything else with ``ModelRejected``):

* one float32 input ``features`` of shape ``(N, N_FEATURES)``, computed by ``featurize``;
* outputs ``tier_probs`` ``(N, 3)`` — a distribution over ``TIERS`` — and ``thinking_probs``
  ``(N, 3)`` — P(thinking on | tier);
* metadata_props ``mesh.router.feature_version`` equal to this release's ``FEATURE_VERSION``,
  ``mesh.router.tiers`` equal to ``TIERS``, ``mesh.router.features`` equal to ``FEATURE_NAMES``
  and ``mesh.router.version`` naming the model.

Loading also runs the model on probe inputs, which both checks its outputs and warms the session up
before the first real decision needs it. Sessions use one intra-op and one inter-op thread: a decision
is a single row, where thread hand-offs cost more than they save, and a node has other work to do.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort  # type: ignore[import-untyped]

from mesh.contracts.models import TIERS
from mesh.errors import ModelRejected
from mesh.router.features import FEATURE_NAMES, FEATURE_VERSION, N_FEATURES

log = logging.getLogger(__name__)

INPUT = "features"
OUTPUTS = ("tier_probs", "thinking_probs")
META_VERSION = "mesh.router.version"
META_FEATURE_VERSION = "mesh.router.feature_version"
META_TIERS = "mesh.router.tiers"
META_FEATURES = "mesh.router.features"
DEFAULT_MODEL = Path(__file__).parent / "models" / "default.onnx"
_PROBES = 8


class RouterModel(Protocol):
    """Anything that maps feature rows to (tier probabilities, thinking probabilities per tier)."""

    @property
    def version(self) -> str: ...

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class OnnxModel:
    """A checked, warmed-up ONNX router model. Thread-safe: onnxruntime sessions may run concurrently."""

    def __init__(self, session: ort.InferenceSession, metadata: dict[str, str], digest: str) -> None:
        self._session = session
        self.metadata = metadata
        self.version = metadata[META_VERSION]
        self.digest = digest

    @classmethod
    def load(cls, data: bytes, *, source: str = "router model") -> OnnxModel:
        """Check ``data`` against the contract above; raise ``ModelRejected`` saying what is wrong."""
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        try:
            session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for bad bytes
            raise ModelRejected(f"{source} is not a loadable ONNX model: {exc}") from exc
        meta = dict(session.get_modelmeta().custom_metadata_map)
        _check_metadata(meta, source)
        _check_signature(session, source)
        model = cls(session, meta, hashlib.sha256(data).hexdigest())
        model._probe(source)
        return model

    @classmethod
    def from_file(cls, path: str | Path) -> OnnxModel:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ModelRejected(f"cannot read router model {path}: {exc}") from exc
        return cls.load(data, source=str(path))

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tiers, thinking = self._session.run(OUTPUTS, {INPUT: x})
        return tiers, thinking

    def _probe(self, source: str) -> None:
        """Run on varied rows: outputs must be finite distributions. Doubles as the warm-up."""
        rows = np.random.default_rng(0).random((_PROBES, N_FEATURES), dtype=np.float32)
        rows[0] = 0.0
        try:
            for i in range(_PROBES):
                tiers, thinking = self.predict(rows[i:i + 1])
        except Exception as exc:
            raise ModelRejected(f"{source} fails to run on a feature row: {exc}") from exc
        tiers, thinking = self.predict(rows)
        if tiers.shape != (_PROBES, len(TIERS)) or thinking.shape != (_PROBES, len(TIERS)):
            raise ModelRejected(f"{source} outputs shapes {tiers.shape} and {thinking.shape}; "
                                f"expected (N, {len(TIERS)}) for both")
        if not (np.isfinite(tiers).all() and np.isfinite(thinking).all()):
            raise ModelRejected(f"{source} outputs non-finite probabilities")
        if np.abs(tiers.sum(axis=1) - 1.0).max() > 1e-3 or tiers.min() < -1e-6:
            raise ModelRejected(f"{source}: tier_probs is not a distribution over {', '.join(TIERS)}")
        if thinking.min() < -1e-6 or thinking.max() > 1 + 1e-6:
            raise ModelRejected(f"{source}: thinking_probs are not probabilities")


def _check_metadata(meta: dict[str, str], source: str) -> None:
    missing = [k for k in (META_VERSION, META_FEATURE_VERSION, META_TIERS, META_FEATURES) if k not in meta]
    if missing:
        raise ModelRejected(f"{source} lacks router metadata {', '.join(missing)}; "
                            "it was not made by `mesh router train`")
    if meta[META_FEATURE_VERSION] != FEATURE_VERSION:
        raise ModelRejected(f"{source} was trained on feature spec {meta[META_FEATURE_VERSION]!r}, but this "
                            f"release computes {FEATURE_VERSION!r}: retrain it with this release")
    if meta[META_TIERS] != ",".join(TIERS):
        raise ModelRejected(f"{source} predicts tiers {meta[META_TIERS]!r}; expected {','.join(TIERS)!r}")
    if meta[META_FEATURES] != ",".join(FEATURE_NAMES):
        raise ModelRejected(f"{source} names features that differ from spec {FEATURE_VERSION!r}")


def _check_signature(session: ort.InferenceSession, source: str) -> None:
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].name != INPUT or inputs[0].type != "tensor(float)" \
            or inputs[0].shape[-1] != N_FEATURES:
        got = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
        raise ModelRejected(f"{source} takes {got}; expected one input {INPUT} tensor(float) [N, {N_FEATURES}]")
    outputs = {o.name for o in session.get_outputs()}
    if not set(OUTPUTS) <= outputs:
        raise ModelRejected(f"{source} has outputs {sorted(outputs)}; expected {', '.join(OUTPUTS)}")
