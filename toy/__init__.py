"""The lab: a toy world of shapes where what DreamBooth learns can be measured for real.

    python -m toy.world out/ --count 16    # scenes of the world and their captions
    python -m toy.score --check            # the scorers' accuracy on fresh scenes
    python -m toy.pretrain                 # pretrain `toy` on the world (~28 min on 2 cores)
    python -m toy.bench --base             # the quality benchmark behind QUALITY.md

world.py draws the world, score.py reads images of it back, pretrain.py makes the shipped model
(model/, which `python -m train --model toy` loads), bench.py trains DreamBooth on it and scores
the result. None of it is part of the trainer: the Cog image leaves this folder out.
"""
