# Deformable DETR-R50 as MMDetection 3.x's configs/deformable_detr/deformable-detr_r50_16xb2-50e_coco.py
# (model, optimizer and schedule; no COCO data), written as what differs from DETR-R50's file: ResNet
# stages 2-4 through a GroupNorm ChannelMapper to 4 levels, deformable attention layers, 300 queries, a
# sigmoid focal head, lr 2e-4 with 0.1x on the backbone, sampling offsets and reference points, 50 epochs.
_base_ = ['../detr/detr_r50_8xb2-150e_coco.py']
model = dict(
    type='DeformableDETR',
    num_queries=300,
    num_feature_levels=4,
    with_box_refine=False,
    as_two_stage=False,
    backbone=dict(out_indices=(1, 2, 3)),
    neck=dict(in_channels=[512, 1024, 2048], norm_cfg=dict(_delete_=True, type='GN', num_groups=32), num_outs=4),
    encoder=dict(  # DeformableDetrTransformerEncoder
        layer_cfg=dict(  # DeformableDetrTransformerEncoderLayer
            _delete_=True,
            self_attn_cfg=dict(embed_dims=256, batch_first=True),  # MultiScaleDeformableAttention
            ffn_cfg=dict(embed_dims=256, feedforward_channels=1024, ffn_drop=0.1))),
    decoder=dict(  # DeformableDetrTransformerDecoder
        layer_cfg=dict(  # DeformableDetrTransformerDecoderLayer
            _delete_=True,
            self_attn_cfg=dict(embed_dims=256, num_heads=8, dropout=0.1, batch_first=True),
            cross_attn_cfg=dict(embed_dims=256, batch_first=True),  # MultiScaleDeformableAttention
            ffn_cfg=dict(embed_dims=256, feedforward_channels=1024, ffn_drop=0.1)),
        post_norm_cfg=None),
    positional_encoding=dict(offset=-0.5),
    bbox_head=dict(
        _delete_=True,
        type='DeformableDETRHead',
        num_classes=80,
        loss_cls=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=2.0),
        loss_bbox={{_base_.model.bbox_head.loss_bbox}},
        loss_iou={{_base_.model.bbox_head.loss_iou}}),
    train_cfg=dict(assigner=dict(match_costs=[
        dict(type='FocalLossCost', weight=2.0),
        dict(type='BBoxL1Cost', weight=5.0, box_format='xywh'),
        dict(type='IoUCost', iou_mode='giou', weight=2.0)])))

optim_wrapper = dict(
    optimizer=dict(lr=0.0002),
    paramwise_cfg=dict(custom_keys=dict(
        _delete_=True,
        backbone=dict(lr_mult=0.1),
        sampling_offsets=dict(lr_mult=0.1),
        reference_points=dict(lr_mult=0.1))))

max_epochs = 50
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[40], gamma=0.1)
]
