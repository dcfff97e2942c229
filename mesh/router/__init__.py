"""Layer 3: routing — features of a step → a tier (edge / long_context / swarm) and thinking on/off."""

from mesh.router.policy import RouteContext, RoutePolicy, RulePolicy

__all__ = ["RouteContext", "RoutePolicy", "RulePolicy"]
