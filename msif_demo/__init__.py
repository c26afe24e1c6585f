"""The demo world: a synthetic fact world (invented people and their facts) and the two tiny models
trained on it. Not Dagster code; used by the app (``msif run`` without an experiment file), the tests
and the benches.

- :mod:`.relations` — relation value pools, statement templates, question forms, filler sentences;
- :mod:`.world` — :class:`WorldParams`, the generator (:func:`generate_world`) and the writers;
- :mod:`.build` — presets, :class:`DemoParams` and :func:`build_demo` (world + trained checkpoints).
"""

from .build import BUILD_VERSION, DemoArtifacts, DemoParams, build_demo
from .world import World, WorldParams, generate_world, save_world

__all__ = ["BUILD_VERSION", "DemoArtifacts", "DemoParams", "World", "WorldParams", "build_demo", "generate_world",
           "save_world"]
