"""Layer 3: routing — features of a step → ONNX model → hard constraints → a tier (edge / long_context /
swarm) and thinking on/off, with the propensity logged; training and evaluation of models.

Nodes import only the runtime (``features``, ``model``, ``policy``, ``runtime``; onnxruntime); hot-swapping a
published model is the roles' business (``mesh.roles.hotswap``), since it needs the bus.
``dataset``, ``train``, ``evaluate`` and ``simenv`` serve ``mesh router`` and the scripts; ``train``
needs the optional ``router`` extra.
"""

from mesh.router.features import FEATURE_VERSION, RouteContext, featurize
from mesh.router.model import OnnxModel, RouterModel
from mesh.router.policy import RoutePolicy, RulePolicy
from mesh.router.runtime import Router, default_router

__all__ = ["FEATURE_VERSION", "OnnxModel", "RouteContext", "RoutePolicy", "Router", "RouterModel", "RulePolicy",
           "default_router", "featurize"]
