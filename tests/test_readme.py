"""The README's in-page links point at something: a heading or an explicit anchor."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def github_slug(heading: str) -> str:
  """GitHub's anchor for a heading: lower case, punctuation (backticks too) dropped, spaces
  to hyphens."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_github_slug_on_known_headings():
  assert github_slug("One round of supernet training") == "one-round-of-supernet-training"
  assert github_slug("Set-up (two lines)") == "set-up-two-lines"
  assert github_slug("EfficientDet-D0 with NSENet backbones (tf-models extension)") == (
      "efficientdet-d0-with-nsenet-backbones-tf-models-extension")
  assert github_slug("The first task: `demo_digits_hard`") == "the-first-task-demo_digits_hard"


def test_every_in_page_link_has_a_target():
  with open(README, encoding="utf-8") as f:
    text = f.read()
  # Headings outside fenced code blocks (a '# ...' line inside ``` is a comment).
  targets, in_code = set(), False
  for line in text.splitlines():
    if line.startswith("```"):
      in_code = not in_code
    elif not in_code and line.startswith("#"):
      targets.add(github_slug(line.lstrip("#")))
  targets |= set(re.findall(r'<a id="([^"]+)"', text))
  links = set(re.findall(r"\]\(#([^)]+)\)", text))
  assert links, "no in-page links found: the pattern is wrong"
  missing = sorted(links - targets)
  assert not missing, f"README links to anchors that do not exist: {missing}"
