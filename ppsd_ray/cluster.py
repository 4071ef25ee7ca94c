"""The one way ppsd-ray starts Ray: the driver, bench, load sweep, data job and server all
call start_ray."""
from __future__ import annotations


def start_ray(**options) -> bool:
    """Starts a local Ray, or joins the cluster at RAY_ADDRESS (`ray job submit` sets it), unless
    this process is already connected. No dashboard and the workers' logs kept off this
    terminal unless `options` say otherwise. Returns whether this call connected, so that
    the caller that did also shuts Ray down."""
    import ray  # here, not at the top: `ppsd eval-acceptance --workers 0` runs without Ray

    if ray.is_initialized():
        return False
    ray.init(**{"include_dashboard": False, "log_to_driver": False, "configure_logging": False, **options})
    return True
