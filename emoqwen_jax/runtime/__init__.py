"""What the process runs on, outside the model: where files live (``storage``: local paths and URIs such as
``gs://``, for every path a user gives), how host memory is allocated (``malloc``: glibc settings for
XLA:CPU's per-step scratch buffer), and how a command's ``--help`` reads (``commands``: examples last)."""
