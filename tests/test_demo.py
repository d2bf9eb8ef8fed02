"""jlora.demo: the demo runs and learns."""

from jlora import demo


def test_demo_learns():
  result = demo.run(rank=4, steps=60, lr=3e-3, log=lambda *_: None)
  assert result["before"] / result["after"] >= 5.0, result
