"""Thin Ray actors around the ppsd_ray library, and the driver API that builds them."""
