"""The speed and memory benchmarks behind BENCHMARKS.md, kept out of the trainer's package.

    python -m bench --list                 # the named scenarios (also: script/bench --list)
    python -m bench --scenario tiny        # one scenario, anywhere, in seconds

bench/speed.py holds the harness and says what each figure means.
"""
