"""A minimal stand-in for `tensorflow`, so kauldron (imported by DeepMind's `gemma`) loads without the ~2 GB
TensorFlow install.

Why: kauldron/typing/array_types.py does `import tensorflow as tf` (only uses tf.Tensor
for isinstance), and kauldron.train -> clu.metric_writers -> tensorboard hparams summary
call a few TF helpers at import time. None of that is used to build/run gm.nn models.
Call install() BEFORE `from gemma import gm`. No-op if real tensorflow is importable.
"""
import importlib.machinery
import importlib.util
import sys
import types


def install():
    if "tensorflow" in sys.modules or importlib.util.find_spec("tensorflow") is not None:
        return
    from unittest import mock
    try:
        from tensorboard.compat import tensorflow_stub as _tbstub
        from tensorboard.util import tensor_util as _tu
    except ImportError:
        _tbstub = _tu = None
    tf = types.ModuleType("tensorflow")
    tf.__spec__ = importlib.machinery.ModuleSpec("tensorflow", None)
    tf.__version__ = "2.99.0"  # fake; tfds checks >= 2.1

    class Tensor:  # never instantiated; isinstance() target only
        pass

    class Variable:  # idem: einops (used by gemma's sampler) tests isinstance(x, (tf.Tensor, tf.Variable))
        pass

    tf.Tensor = Tensor
    tf.Variable = Variable
    if _tu is not None:
        tf.make_tensor_proto = _tu.make_tensor_proto

    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        if _tbstub is not None and hasattr(_tbstub, name):
            v = getattr(_tbstub, name)
        else:
            v = mock.MagicMock(name=f"tensorflow.{name}")
        setattr(tf, name, v)
        return v

    tf.__getattr__ = __getattr__
    sys.modules["tensorflow"] = tf
