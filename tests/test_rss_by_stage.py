"""benchmarks/rss_by_stage.py: each resident-set sample belongs to the stage the command last announced."""

import sys

from conftest import benchmark_script

CHILD = """
import sys, time
print("[small]", file=sys.stderr, flush=True)
time.sleep(0.6)
print("[large]", file=sys.stderr, flush=True)
block = bytearray(300 * 2**20)
block[:: 4096] = b"1" * len(block[:: 4096])  # touch every page, so that it is resident
time.sleep(0.6)
del block
print("progress 50%\\r[freed]", file=sys.stderr, flush=True)  # a stage line after a progress bar's carriage return
time.sleep(0.6)
"""


def test_the_peak_is_attributed_to_the_stage_that_allocated_it():
    rss = benchmark_script("rss_by_stage")
    code, samples, stages = rss.run_sampled([sys.executable, "-c", CHILD], interval=0.05)
    assert code == 0
    assert [name for _, name in stages] == ["(start)", "small", "large", "freed"]
    peak = {name: max(s.anon_bytes for s in samples if s.stage == name) for name in ("small", "large", "freed")}
    assert peak["large"] - peak["small"] > 250 * 2**20
    assert peak["freed"] < peak["small"] + 50 * 2**20
    table = rss.stage_table(samples, stages, samples[-1].seconds, weights=300 * 2**20).splitlines()
    assert [line.split(" | ")[0] for line in table[2:]] == ["| (start)", "| small", "| large", "| freed"]
    large = table[4].split(" | ")
    assert float(large[2]) >= 0.28 and large[5].endswith("x |")
