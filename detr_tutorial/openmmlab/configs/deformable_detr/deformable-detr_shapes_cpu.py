# Chapter 12's Deformable DETR on the shapes data (preset 'shapes_cpu', model 'deformable_detr'): DETR's
# shapes config with DETR's small backbone returning its three stages (strides 2, 4, 8), a fourth level from
# a stride-2 conv, d=64, multi-scale deformable attention, sigmoid focal classification (weight 2, cost 2).
_base_ = ['../detr/detr_shapes_cpu.py']
embed_dims = 64
ffn = dict(embed_dims=embed_dims, feedforward_channels=128, ffn_drop=0.0)
model = dict(
    type='DeformableDETR',
    num_feature_levels=4,
    with_box_refine=False,
    as_two_stage=False,
    backbone=dict(return_interm_layers=True),
    neck=dict(in_channels=[16, 32, 64], norm_cfg=dict(_delete_=True, type='GN', num_groups=32), num_outs=4),
    encoder=dict(layer_cfg=dict(_delete_=True, self_attn_cfg=dict(embed_dims=embed_dims, num_points=4),
                                ffn_cfg=ffn)),
    decoder=dict(layer_cfg=dict(_delete_=True, self_attn_cfg=dict(embed_dims=embed_dims, num_heads=4, dropout=0.0),
                                cross_attn_cfg=dict(embed_dims=embed_dims, num_points=4), ffn_cfg=ffn)),
    positional_encoding=dict(offset=-0.5),
    bbox_head=dict(
        type='DeformableDETRHead',
        loss_cls=dict(_delete_=True, type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=2.0)),
    train_cfg=dict(assigner=dict(match_costs=[
        dict(type='FocalLossCost', weight=2.0),
        dict(type='BBoxL1Cost', weight=5.0, box_format='xywh'),
        dict(type='IoUCost', iou_mode='giou', weight=2.0)])))
