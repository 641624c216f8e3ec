"""ma-ray: MoE training with attention and experts on disjoint GPU pools of a Ray cluster."""


def connect(*args, **kwargs):
    """Client for a running job's controller; see ``ma_ray.control.client.connect``."""
    from ma_ray.control.client import connect as _connect

    return _connect(*args, **kwargs)
