"""llmkit: from raw text to a trained, compressed, evaluated language model.

Library use mirrors the CLI:

    from llmkit import load_recipe
    from llmkit import pretrain

    recipe = load_recipe("pretrain-zh-tiny", ["train.max_steps=100"])
    result = pretrain.run(recipe, overwrite=True)
"""

from llmkit.console import quiet_import_notices
from llmkit.errors import LlmkitError
from llmkit.recipe import load_recipe
from llmkit.settings import Recipe

quiet_import_notices()
__version__ = "0.1.0"
__all__ = ["LlmkitError", "Recipe", "load_recipe", "__version__"]
