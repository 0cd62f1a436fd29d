"""dckpt inside the training frameworks: one module per framework, imported only when used.

``dckpt.integrations.lightning`` (PyTorch Lightning strategies), ``dckpt.integrations.hf``
(the Hugging Face Trainer and Accelerate). ``common`` holds what they share: the pointer
file a framework sees where it expects its checkpoint, the state outside tensors as one
verified value, and the save in flight. The frameworks are optional extras
(``pip install dckpt[lightning]``, ``dckpt[hf]``), never dependencies of the core package.
"""
