"""The Label Studio labeling config defect-loop sets up: XML, instructions and class colours.

Pure text in, text out. The config (`label_config_xml`): an ``Image`` named ``image`` (value
``$image``), one ``RectangleLabels`` named ``label`` with one ``Label`` per class in config order
(class id = position), optionally a ``PolygonLabels`` named ``polygon`` with the same labels (a
polygon becomes its bounding box on pull), and a ``Choices`` named ``verdict`` with one choice
``defect-free``. An annotation submitted with no regions is a defect-free image (a negative
example), with or without that choice; the labeling instructions say so.

Optional controls: a ``BrushLabels`` named ``brush`` with the class labels (``segment``
projects: a painted mask is kept as a polygon instance), and a ``KeyPointLabels`` named
``keypoint`` with one label ``<class>/<name>`` per configured keypoint (`loop.keypoints`),
coloured like its class. Label Studio's editor (1.23) links a region to a parent when the labeler
drags it onto that region in the Regions list (it then exports ``parentID``); each class label
with keypoints gets ``groupcancontain`` = its keypoint labels, so only those can be dropped on a
region of that class.
"""

from __future__ import annotations

import colorsys
import html
import xml.etree.ElementTree as ET

from loop.errors import ConfigError, LabelStudioError
from loop.formats.labelstudio import (
    BRUSH_NAME,
    DEFECT_FREE,
    FROM_NAME,
    KEYPOINT_NAME,
    POLYGON_NAME,
    TO_NAME,
    VERDICT_NAME,
)
from loop.keypoints import KeypointNames, check_keypoint_config, keypoint_labels

# Distinct, readable colours (tab10 + a few extra); more classes get evenly spaced hues.
_PALETTE = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#393b79", "#ad494a", "#637939", "#8c6d31", "#7b4173", "#3182bd",
]  # fmt: skip


def _colour(i: int, n: int) -> str:
    if n <= len(_PALETTE):
        return _PALETTE[i]
    r, g, b = colorsys.hsv_to_rgb(i / n, 0.75, 0.85)
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"


def check_class_names(class_names: list[str]) -> None:
    """Raise `ConfigError` unless ``class_names`` is a non-empty list of unique, non-blank
    strings."""
    if not class_names:
        raise ConfigError("class_names must list at least one class")
    if any(not isinstance(c, str) or not c.strip() for c in class_names):
        raise ConfigError(f"class names must be non-empty strings, got {class_names}")
    if len(set(class_names)) != len(class_names):
        raise ConfigError(f"class names must be unique, got {class_names}")


def label_config_xml(
    class_names: list[str],
    instructions: str = "",
    polygons: bool = False,
    *,
    brush: bool = False,
    keypoints: KeypointNames | None = None,
) -> str:
    """Label Studio labeling config: rectangles (``RectangleLabels`` named ``label``), and with
    ``polygons`` also ``PolygonLabels`` named ``polygon``, on an ``Image`` named ``image`` (value
    ``$image``); one ``Label`` per class in the given order, each with its own colour; a
    ``Choices`` named ``verdict`` offering ``defect-free``; ``instructions`` (plain text) appear
    as a header above the image. ``brush`` adds ``BrushLabels`` named ``brush`` (same labels);
    ``keypoints`` (class -> ordered names) adds ``KeyPointLabels`` named ``keypoint``, one label
    ``<class>/<name>`` per keypoint.

    Raises `ConfigError` for an empty, blank or duplicate class list or a bad keypoint list.
    """
    check_class_names(class_names)
    if keypoints:
        check_keypoint_config(keypoints, class_names)
    view = ET.Element("View")
    if instructions.strip():
        ET.SubElement(view, "Header", value=instructions.strip())
    ET.SubElement(view, "Image", name=TO_NAME, value="$" + TO_NAME, zoom="true")
    controls = [("RectangleLabels", FROM_NAME)]
    if polygons:
        controls.append(("PolygonLabels", POLYGON_NAME))
    if brush:
        controls.append(("BrushLabels", BRUSH_NAME))
    labels = keypoint_labels(keypoints, class_names) if keypoints else {}
    for tag, name in controls:
        el = ET.SubElement(view, tag, name=name, toName=TO_NAME)
        for i, cls in enumerate(class_names):
            lbl = ET.SubElement(el, "Label", value=cls, background=_colour(i, len(class_names)))
            children = [label for label, (c, _) in labels.items() if c == cls]
            if children and not any("," in c for c in children):  # a comma-separated list
                lbl.set("groupcancontain", ",".join(children))
    if keypoints:
        el = ET.SubElement(view, "KeyPointLabels", name=KEYPOINT_NAME, toName=TO_NAME)
        for label, (cls, _) in keypoint_labels(keypoints, class_names).items():
            colour = _colour(class_names.index(cls), len(class_names))
            ET.SubElement(el, "Label", value=label, background=colour)
    verdict = ET.SubElement(
        view, "Choices", name=VERDICT_NAME, toName=TO_NAME, choice="single", showInline="true"
    )
    ET.SubElement(verdict, "Choice", value=DEFECT_FREE)
    ET.indent(view)
    return ET.tostring(view, encoding="unicode")


def instructions_html(
    class_names: list[str],
    instructions: str = "",
    polygons: bool = False,
    *,
    brush: bool = False,
    keypoints: KeypointNames | None = None,
) -> str:
    """The labeling instructions shown to labelers (project ``expert_instruction``, HTML): the
    guidelines, the classes with their colours, and how to submit a defect-free image."""
    paragraphs = [p.strip() for p in instructions.split("\n\n") if p.strip()]
    parts = [f"<p>{html.escape(p)}</p>" for p in paragraphs]
    items = "".join(
        f'<li><span style="color:{_colour(i, len(class_names))}">&#9632;</span> '
        f"{html.escape(c)}</li>"
        for i, c in enumerate(class_names)
    )
    shape = "a tight box (or a polygon)" if polygons else "a tight box"
    if polygons and brush:
        shape = "a tight box, a polygon or a brush mask"
    parts.append(f"<p>Classes (draw {shape} per defect):</p><ul>{items}</ul>")
    if keypoints:
        names = "".join(
            f"<li>{html.escape(label)}</li>" for label in keypoint_labels(keypoints, class_names)
        )
        parts.append(
            "<p><b>Keypoints</b> (at most one of each name per defect):</p>"
            f"<ul>{names}</ul><p>To link a keypoint to its defect, drag the keypoint onto the "
            "defect's region in the Regions list. An unlinked keypoint goes to the smallest "
            "region of its class that contains it, else to the nearest region of its class.</p>"
        )
    parts.append(
        "<p><b>Defect-free image:</b> submit it with NO regions (you may tick "
        f"&quot;{DEFECT_FREE}&quot;): it becomes a negative example for training. Use "
        "<i>Skip</i> only when you cannot decide: skipped images are not used as negatives.</p>"
    )
    return "\n".join(parts)


def _labels_of(root: ET.Element, tag: str, name: str) -> list[str] | None:
    for el in root.iter(tag):
        if el.get("name") == name:
            return [str(lbl.get("value")) for lbl in el.iter("Label")]
    return None


def classes_from_label_config(xml: str) -> list[str]:
    """Class names of the ``RectangleLabels`` named ``label`` in a labeling config, in order.

    Raises `LabelStudioError` when the config has no such control.
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise LabelStudioError(f"project labeling config is not valid XML: {exc}") from exc
    labels = _labels_of(root, "RectangleLabels", FROM_NAME)
    if labels is None:
        raise LabelStudioError(
            f"project labeling config has no <RectangleLabels name={FROM_NAME!r}>; it was not "
            "created by defect-loop: choose another project title"
        )
    return labels


def has_control(xml: str, tag: str, name: str) -> bool:
    """Whether a labeling config has the control ``<tag name=name>`` (False for bad XML)."""
    try:
        return _labels_of(ET.fromstring(xml), tag, name) is not None
    except ET.ParseError:
        return False


def has_polygons(xml: str) -> bool:
    """Whether a labeling config offers the ``PolygonLabels`` named ``polygon`` (False for XML
    that does not parse)."""
    try:
        return _labels_of(ET.fromstring(xml), "PolygonLabels", POLYGON_NAME) is not None
    except ET.ParseError:
        return False
