"""A report's HTML as a real browser shows it: Debian's chromium, headless, to a PNG, the blank
page below the report cut off. For looking at a report (docs/report.png is one) and checking
that its figures and tables render.

  python tools/screenshot_report.py runs/moe_vs_dense/report.html docs/report.png

Needs chromium (as root: apt-get install -y chromium).
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image


def screenshot(html_path: str, png_path: str, width: int = 1000, height: int = 8000) -> None:
  """Renders html_path at `width` pixels into png_path, `height` at most, trimmed at the
  bottom to the last non-white row (plus a margin)."""
  browser = shutil.which("chromium")
  if browser is None:
    raise SystemExit("No chromium: install it (as root: apt-get install -y chromium)")
  with tempfile.TemporaryDirectory() as profile:  # no state left in the user's profile
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={profile}", f"--window-size={width},{height}",
                    f"--screenshot={os.path.abspath(png_path)}",
                    "file://" + os.path.abspath(html_path)],
                   check=True, capture_output=True, timeout=120)
  image = Image.open(png_path).convert("RGB")
  ink = np.flatnonzero((np.asarray(image) < 250).any(axis=(1, 2)))
  image.crop((0, 0, width, min(height, (ink[-1] if len(ink) else 0) + 40))).save(png_path)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("html")
  parser.add_argument("png")
  parser.add_argument("--width", type=int, default=1000)
  args = parser.parse_args(argv)
  screenshot(args.html, args.png, args.width)
  print(args.png)
  return 0


if __name__ == "__main__":
  sys.exit(main())
