"""Empty: the modes moved into the core (:mod:`kdcore.distillation_modes`).

An editable install made before the move still lists this module as the ``modes`` entry
point until it is reinstalled; it stays importable (registering nothing) until then.
"""
