"""The recipes (``--method NAME``): each a ``Recipe``, data naming components and option defaults.
Importing the package registers them and every component they name."""
from .. import adapters as _adapters  # noqa: F401  (the components the recipes name)
from .. import calibration as _calibration  # noqa: F401
from .. import classification as _classification  # noqa: F401
from .. import coda_prompt as _coda_prompt  # noqa: F401
from .. import constraints as _constraints  # noqa: F401
from .. import dualprompt as _dualprompt  # noqa: F401
from .. import ease as _ease  # noqa: F401
from .. import feature_compression as _feature_compression  # noqa: F401
from .. import imprint as _imprint  # noqa: F401
from .. import l2p as _l2p  # noqa: F401
from .. import ranpac as _ranpac  # noqa: F401
from .. import replay as _replay  # noqa: F401
from .. import simplecil as _simplecil  # noqa: F401
from .. import terms as _terms  # noqa: F401
from ..memory import compressors as _compressors  # noqa: F401
from ..memory import mnemonics as _exemplar_optimizers  # noqa: F401
from ..memory import selection as _selection  # noqa: F401
from . import baselines, der, foster, lucir, lwm, mnemonics, podnet, pretrained, wa  # noqa: F401  (register the recipes)
from .recipe import METHODS, Recipe, register_recipe  # noqa: F401
