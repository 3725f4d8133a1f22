"""Model definitions: SAM-Med3D (``sam_med3d``) and the tri-plane classifier (``triplane``)."""
