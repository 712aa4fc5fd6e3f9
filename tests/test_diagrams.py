"""The Mermaid diagrams of README.md and docs/ render in mermaid itself (``mmdc`` in headless
chromium, ``make tools``), so that a broken diagram fails the suite rather than showing as an
error box on GitHub; the check is shown to fail on a broken diagram, and the block extraction is
checked without a browser."""

from __future__ import annotations

import time

import mermaid_cli as diagrams
import pytest
from conftest import report
from mermaid_cli import DiagramError, MermaidBlock

from utils.operations import tools
from utils.layout import PROJECT_ROOT

VALID = """\
# Six diagrams

```mermaid
flowchart TD
  prompt[Prompt] --> tokenizer{Tokenizer}
  tokenizer --> encoder[TextEncoder]
  encoder --> unet[UNetLoop]
  unet --> decoder[VaeDecoder]
```

```mermaid
sequenceDiagram
  participant client as Client
  participant triton as Triton
  client->>triton: infer(prompt)
  triton-->>client: image
```

```mermaid
graph LR
  subgraph Server
    pipeline[PipelineBLS] --> network[UNetModel]
    pipeline --> vae[VaeModel]
  end
  subgraph Clients
    http[HttpClient]
  end
  http --> pipeline
```

```mermaid
flowchart LR
  export[Export] --> repository[Repository] --> serve[Serve]
```

```mermaid
sequenceDiagram
  Scheduler->>Network: step
  Network-->>Scheduler: noise
```

```mermaid
graph LR
  subgraph onnx[OnnxRoute]
    model[ModelOnnx]
  end
  subgraph tensorrt[TensorrtRoute]
    engine[ModelPlan]
  end
  model --> engine
```
"""
LABELS = ["Tokenizer", "TextEncoder", "Triton", "PipelineBLS", "HttpClient", "Repository", "Scheduler",
          "OnnxRoute", "ModelPlan"]

BROKEN = """\
# A broken diagram between two good ones

```mermaid
graph LR
  good --> first
```

```mermaid
graph LR
  A -->> B[unclosed
```

```mermaid
sequenceDiagram
  Alice->>Bob: fine
```
"""


@pytest.mark.slow
@pytest.mark.parametrize("document", diagrams.documents(),
                         ids=lambda path: str(path.relative_to(PROJECT_ROOT)))
def test_the_documents_diagrams_render(document):
    blocks = diagrams.document_blocks([document])
    if not blocks:
        return  # nothing to draw; mmdc is not even needed
    for block, svg in zip(blocks, diagrams.render(blocks)):
        assert svg.lstrip().startswith("<svg"), block


@pytest.mark.slow
def test_valid_diagrams_render_to_svgs_with_their_labels(tmp_path):
    document = tmp_path / "valid.md"
    document.write_text(VALID)
    began = time.perf_counter()
    rendered = diagrams.render_documents([document])
    seconds = time.perf_counter() - began
    report(f"mermaid: {len(rendered)} diagrams (flowchart, sequenceDiagram, graph LR with subgraphs) rendered "
           f"by mmdc in {seconds:.1f} s")
    assert [block.line for block, _ in rendered] == [3, 11, 19, 31, 36, 42]
    svgs = "".join(svg for _, svg in rendered)
    assert all(svg.lstrip().startswith("<svg") for _, svg in rendered)
    for label in LABELS:
        assert label in svgs, label


@pytest.mark.slow
def test_a_broken_diagram_fails_naming_its_document_and_line(tmp_path):
    document = tmp_path / "broken.md"
    document.write_text(BROKEN)
    with pytest.raises(DiagramError) as raised:
        diagrams.render_documents([document])
    message = str(raised.value)
    assert f"{document} line 8: the mermaid diagram does not render" in message
    assert "Parse error on line 2" in message  # mermaid's own message, through mmdc
    assert "line 3" not in message and "line 13" not in message  # the good ones are not blamed
    assert "file://" not in message and "    at " not in message  # no stack trace


def test_mermaid_blocks_are_the_mermaid_fences_with_their_lines():
    text = """\
# Title

```mermaid
graph LR
  A --> B
```

```python
print("not a diagram")
```

````markdown
```mermaid
graph LR
  shown --> not_drawn
```
````

- a list item:

  ~~~ mermaid
  sequenceDiagram
    A->>B: hi
  ~~~

```mermaid
flowchart TD
  unclosed --> runs_to_the_end
"""
    blocks = diagrams.mermaid_blocks(text, PROJECT_ROOT / "docs" / "example.md")
    assert [(block.line, block.source) for block in blocks] == [
        (3, "graph LR\n  A --> B\n"),
        (21, "sequenceDiagram\n  A->>B: hi\n"),
        (26, "flowchart TD\n  unclosed --> runs_to_the_end\n"),
    ]
    assert str(blocks[0]) == "docs/example.md line 3"
    assert diagrams.mermaid_blocks("no fences\n```\ncode\n```\n") == []


def test_a_block_mmdc_would_cut_short_is_refused_before_rendering():
    block = MermaidBlock(PROJECT_ROOT / "README.md", 5, "graph LR\n  A --> B\n:::\n")
    with pytest.raises(DiagramError, match=r"README.md line 5: a line of three backticks or colons"):
        diagrams.render([block])


def test_without_mmdc_the_error_says_make_tools(tmp_path, monkeypatch):
    monkeypatch.setattr(tools, "TOOLS_DIR", tmp_path)
    block = MermaidBlock(PROJECT_ROOT / "README.md", 1, "graph LR\n  A --> B\n")
    with pytest.raises(tools.ToolMissing, match=r"mmdc is not installed .*`make tools`"):
        diagrams.render([block])
