"""The Triton model repository: the configs generated from the specs (``configs``), the writer that
lays the repository out (``writer``, step 3), the TensorRT engines built into it (``engines``,
P4), a Python environment of the pipeline models' own (``environments``) and the GPUs it names
(``gpus``)."""
