# Chapter 12's Deformable DETR on the shapes data (preset 'shapes_cpu', model 'deformable_detr'): DETR's
# small backbone returning its three stages (strides 2, 4, 8), a fourth level from a stride-2 conv, d=64.
_base_ = ['../detr/detr_shapes_cpu.py']
embed_dims = 64
ffn = dict(embed_dims=embed_dims, feedforward_channels=128, ffn_drop=0.0)
model = dict(
    _delete_=True,
    type='DeformableDETR',
    num_queries=8,
    num_feature_levels=4,
    with_box_refine=False,
    as_two_stage=False,
    backbone=dict(type='SmallBackbone', widths=(16, 32, 64), strides=(2, 2, 2), return_interm_layers=True),
    neck=dict(type='ChannelMapper', in_channels=[16, 32, 64], kernel_size=1, out_channels=embed_dims,
              act_cfg=None, norm_cfg=dict(type='GN', num_groups=32), num_outs=4),
    encoder=dict(num_layers=2, layer_cfg=dict(self_attn_cfg=dict(embed_dims=embed_dims, num_points=4),
                                              ffn_cfg=ffn)),
    decoder=dict(num_layers=3, return_intermediate=True,
                 layer_cfg=dict(self_attn_cfg=dict(embed_dims=embed_dims, num_heads=4, dropout=0.0),
                                cross_attn_cfg=dict(embed_dims=embed_dims, num_points=4), ffn_cfg=ffn)),
    positional_encoding=dict(type='SinePositionalEncoding', num_feats=embed_dims // 2, normalize=True,
                             offset=-0.5),
    bbox_head=dict(
        type='DeformableDETRHead',
        num_classes=3,
        embed_dims=embed_dims,
        loss_cls=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=2.0),
        loss_bbox=dict(type='L1Loss', loss_weight=5.0),
        loss_iou=dict(type='GIoULoss', loss_weight=2.0)),
    train_cfg=dict(
        assigner=dict(
            type='HungarianAssigner',
            match_costs=[
                dict(type='FocalLossCost', weight=2.0),
                dict(type='BBoxL1Cost', weight=5.0, box_format='xywh'),
                dict(type='IoUCost', iou_mode='giou', weight=2.0)
            ])),
    test_cfg=dict(max_per_img=100))
