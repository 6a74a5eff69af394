"""Classification: image encoders merged while every task keeps its own head.

The setting of most published merging results (model soups, WiSE-FT, the CLIP eight-task
benchmark): fine-tunes of one image encoder are merged, and each task is read through its
own head, which is part of the task and not of the merge.

* ``heads``: ``TaskHead`` (logits from the encoder's pooled output) and its sources: CLIP's
  zero-shot head (class names under prompt templates), an image classifier's own
  ``classifier`` layer, class prototypes; ``features`` reads the pooled output of any of
  the encoders (CLIP's vision tower or whole model, ViT-style classifiers, ``pooler_output``).
* ``images``: procedural classification tasks (shape, colour, count, texture, position,
  orientation, digits), each with its own image distribution and label set.
* ``zoo``: the vision zoo (``evomerge-zoo build --kind vision``): a small pretrained
  ``CLIPVisionModel``, one expert per task and each task's head, built locally in about two
  minutes, and soup ingredients on request.

The merge core merges encoders as it merges language models (tensor by tensor, by name);
a recipe's ``keep`` names what is not merged and is taken from the base as it is (each
fine-tune's own classifier, or CLIP's text tower). The evaluators
``classification`` and ``classification_entropy`` (``evomerge.evaluate``) score a live
encoder through the heads; AdaMerging minimizes the latter's entropy.
"""
