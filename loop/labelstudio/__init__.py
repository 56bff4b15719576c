"""The Label Studio gateway: the only part of defect-loop that talks to Label Studio.

`LabelStudioGateway` is one object made of one part per concern:

- `loop.labelstudio.transport`: calls, retries with backoff and jitter, errors, paged listings;
- `loop.labelstudio.projects`: project set-up (labeling config, instructions, the "most
  valuable first" and "review queue" views, per-task overlap settings, local storage,
  webhooks);
- `loop.labelstudio.push`: pre-annotated tasks, best first, never duplicated;
- `loop.labelstudio.pull`: incremental export of what changed, judged task by task;
- `loop.labelstudio.review`: label review tasks (suspect labels beside the model's boxes);
- `loop.labelstudio.labeler`: a simulated labeler's helpers (demo and tests).

What the JSON means (regions <-> `Detections`, the rules that make an annotation a label) is pure
code in `loop.formats.labelstudio` (rectangles, task fields), `loop.formats.labelstudio_regions`
(polygons, brush, keypoints), `loop.formats.labelstudio_pull` (the pull rules) and
`loop.formats.labelstudio_config`; the types a push takes and a pull returns are
backend-neutral (`loop.labeling`), shared with the oracle labeler.
"""

from __future__ import annotations

from loop.labeling import PulledLabel, PullResult, PushItem, PushSummary
from loop.labelstudio.labeler import Labeler
from loop.labelstudio.projects import ProjectSetup
from loop.labelstudio.pull import Pulling
from loop.labelstudio.push import Pushing
from loop.labelstudio.review import Reviewing


class LabelStudioGateway(ProjectSetup, Reviewing, Pushing, Pulling, Labeler):
    """Everything defect-loop does with a Label Studio server (a `loop.labeling.
    LabelingBackend`). ``LabelStudioGateway(url, api_token, timeout_s=30)``: see
    `loop.labelstudio.transport.Transport`. Use it as a context manager to close its
    connections."""

    def __enter__(self) -> LabelStudioGateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["LabelStudioGateway", "PullResult", "PulledLabel", "PushItem", "PushSummary"]
