# Chapter 14's Conditional DETR on the shapes data at DETR's sizes (MMDetection 3.x:
# configs/conditional_detr/conditional-detr_r50_8xb2-50e_coco.py): sigmoid focal classification, costs
# and loss weights 2 / 5 / 2, top-100 detections.
_base_ = ['../detr/detr_shapes_cpu.py']
focal_head = dict(
    type='ConditionalDETRHead',
    loss_cls=dict(_delete_=True, type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=2.0))
model = dict(
    type='ConditionalDETR',
    bbox_head=focal_head,
    train_cfg=dict(assigner=dict(match_costs=[
        dict(type='FocalLossCost', weight=2.0),
        dict(type='BBoxL1Cost', weight=5.0, box_format='xywh'),
        dict(type='IoUCost', iou_mode='giou', weight=2.0)])))
