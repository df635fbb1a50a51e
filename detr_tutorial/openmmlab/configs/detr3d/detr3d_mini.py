# The book's mini DETR3D on the multi-camera world (the library's preset 'detr3d_live'), written as WangYueFt/detr3d
# writes projects/configs/detr3d/detr3d_res101_gridmask.py: plugin lines, the Detr3D detector, the Detr3DHead
# with its Detr3DTransformer settings, NMSFreeCoder and HungarianAssigner3D. What differs: the book's small
# backbone (4 stages of 16/32/64/64 channels, strides 4/8/16 of the last three) instead of ResNet-101 + DCN,
# its GroupNorm input projection (ChannelMapper, + one stride-2 level) instead of FPN, d=64, 4 heads, 3 layers,
# FFN 128, 30 queries, no dropout, no GridMask, an 8-number box code (the world is static: no velocity),
# 3 classes, pc_range from the world; AdamW lr 2e-3 (backbone too), weight decay 1e-2, clipping at 35 (as
# DETR3D), 50 warm-up steps, one epoch.
_base_ = ['../_base_/datasets/multiview_world.py', '../_base_/default_runtime.py']

plugin = True
plugin_dir = 'detr_tutorial/openmmlab/detr3d_plugin/'

point_cloud_range = [-25.0, -25.0, -1.0, 25.0, 25.0, 4.0]
embed_dims = 64
num_cams = 6
num_levels = 4

model = dict(
    type='Detr3D',
    use_grid_mask=False,
    img_backbone=dict(type='SmallBackbone', widths=(16, 32, 64, 64), strides=(2, 2, 2, 2), return_interm_layers=True),
    img_neck=dict(
        type='ChannelMapper',
        in_channels=[32, 64, 64],
        out_channels=embed_dims,
        norm_cfg=dict(type='GN', num_groups=32),
        num_outs=num_levels),
    pts_bbox_head=dict(
        type='Detr3DHead',
        num_query=30,
        num_classes=3,
        in_channels=embed_dims,
        code_size=8,
        code_weights=[1.0] * 8,
        with_box_refine=True,
        as_two_stage=False,
        transformer=dict(
            type='Detr3DTransformer',
            num_feature_levels=num_levels,
            num_cams=num_cams,
            decoder=dict(
                type='Detr3DTransformerDecoder',
                num_layers=3,
                return_intermediate=True,
                transformerlayers=dict(
                    type='DetrTransformerDecoderLayer',
                    attn_cfgs=[
                        dict(type='MultiheadAttention', embed_dims=embed_dims, num_heads=4, dropout=0.0),
                        dict(type='Detr3DCrossAtten', pc_range=point_cloud_range, num_points=1,
                             embed_dims=embed_dims, num_levels=num_levels, num_cams=num_cams, dropout=0.0)
                    ],
                    feedforward_channels=128,
                    ffn_dropout=0.0,
                    operation_order=('self_attn', 'norm', 'cross_attn', 'norm', 'ffn', 'norm')))),
        bbox_coder=dict(
            type='NMSFreeCoder',
            post_center_range=[-35.0, -35.0, -10.0, 35.0, 35.0, 10.0],  # pc_range + 10 m in x, y, as DETR3D's
            pc_range=point_cloud_range,
            max_num=100,
            num_classes=3),
        loss_cls=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=2.0),
        loss_bbox=dict(type='L1Loss', loss_weight=0.25),
        loss_iou=dict(type='GIoULoss', loss_weight=0.0)),
    train_cfg=dict(pts=dict(
        assigner=dict(
            type='HungarianAssigner3D',
            cls_cost=dict(type='FocalLossCost', weight=2.0),
            reg_cost=dict(type='BBox3DL1Cost', weight=0.25),
            iou_cost=dict(type='IoUCost', weight=0.0),  # "Fake cost", as in DETR3D's config
            pc_range=point_cloud_range))))

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-3, weight_decay=1e-2, fused=True),  # fused: the engine's AdamW kernel
    clip_grad=dict(max_norm=35, norm_type=2),
    paramwise_cfg=dict(custom_keys={'backbone': dict(lr_mult=1.0)}))

max_epochs = 1
warmup_iters = 50
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=1)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
param_scheduler = [
    dict(type='LinearLR', start_factor=1 / warmup_iters, by_epoch=False, begin=0, end=warmup_iters),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[], gamma=0.1)  # lr_drop 1 = 1 epoch
]
