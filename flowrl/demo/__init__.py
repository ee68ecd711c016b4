"""What the shipped demos need and the library does not: the ``shapes`` scene grammar, renderer and
checker (:mod:`flowrl.demo.shapes`), the arithmetic task (:mod:`flowrl.demo.arithmetic`), the
pretraining of the demo models (:mod:`flowrl.demo.pretrain_image`, :mod:`flowrl.demo.pretrain_text`)
and the tiny-model builders used by the tests and ``flowrl make-tiny`` (:mod:`flowrl.demo.tiny_image`,
:mod:`flowrl.demo.tiny_text`).

This package imports the library; the library reaches it only for the built-in ``shapes:<split>`` /
``arithmetic:<split>`` prompt sources, the ``shapes`` scorer (a thin wrapper in :mod:`scorers.shapes`)
and ``flowrl make-tiny``.
"""

# ``flowrl make-tiny FAMILY DIR``: the builder of each image family's tiny real-format pipeline ("module:function",
# called with ``seed=``); imported only when used (they import torch, diffusers and transformers).
TINY_BUILDERS = {
    "sd3": "flowrl.demo.tiny_image:build_tiny_sd3_pipeline",
    "flux": "flowrl.demo.tiny_image:build_tiny_flux_pipeline",
    "z_image": "flowrl.demo.tiny_z_image:build_tiny_z_image_pipeline",
    "qwen_image": "flowrl.demo.tiny_qwen_image:build_tiny_qwen_image_pipeline",
    "flux2": "flowrl.demo.tiny_flux2:build_tiny_flux2_pipeline",
    "flux2_klein": "flowrl.demo.tiny_flux2:build_tiny_flux2_klein_pipeline",
    "wan": "flowrl.demo.tiny_wan:build_tiny_wan_pipeline",
    "flux_kontext": "flowrl.demo.tiny_flux_kontext:build_tiny_flux_kontext_pipeline",
    "qwen_image_edit": "flowrl.demo.tiny_qwen_image_edit:build_tiny_qwen_image_edit_pipeline",
}
