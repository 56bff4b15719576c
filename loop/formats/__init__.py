"""Converters between `Detections` and external formats: YOLO text (`yolo`), Pascal VOC XML
(`voc`), Label Studio JSON and its pull rules (`labelstudio`) and labeling config
(`labelstudio_config`), cleanlab's object-detection inputs (`cleanlab`). The conversions are
pure functions named ``src_to_dst``; the few helpers that touch files are named for it:
`voc.read_voc_folder` / `voc.write_yolo_folder` read and write folders,
`labelstudio.check_image_url` resolves a path under Label Studio's document root."""
