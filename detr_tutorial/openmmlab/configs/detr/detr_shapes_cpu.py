# Chapter 10's DETR on the shapes data (the library's preset 'shapes_cpu'), written as MMDetection writes
# configs: the DETR-R50 file as the base, then what differs. The small CPU backbone, d=64, 4 heads, 2 + 3
# layers, FFN 128, 8 queries, no dropout, 3 classes (losses and matcher as DETR-R50's); AdamW lr 1e-3
# (backbone too), weight decay 1e-4, clipping at 0.1, 200 warm-up steps, lr / 10 after epoch 12 of 16.
_base_ = ['../_base_/datasets/shapes_detection.py', './detr_r50_8xb2-150e_coco.py']
embed_dims = 64
attn = dict(embed_dims=embed_dims, num_heads=4, dropout=0.0, batch_first=True)
ffn = dict(embed_dims=embed_dims, feedforward_channels=128, num_fcs=2, ffn_drop=0.0,
           act_cfg=dict(type='ReLU', inplace=True))
model = dict(
    num_queries=8,
    backbone=dict(_delete_=True, type='SmallBackbone', widths=(16, 32, 64), strides=(2, 2, 2)),
    neck=dict(in_channels=[64], out_channels=embed_dims),
    encoder=dict(num_layers=2, layer_cfg=dict(self_attn_cfg=attn, ffn_cfg=ffn)),
    decoder=dict(num_layers=3, layer_cfg=dict(self_attn_cfg=attn, cross_attn_cfg=attn, ffn_cfg=ffn)),
    positional_encoding=dict(num_feats=embed_dims // 2),
    bbox_head=dict(num_classes=3, embed_dims=embed_dims))

optim_wrapper = dict(
    optimizer=dict(lr=1e-3, weight_decay=1e-4, fused=True),  # fused: the engine's AdamW kernel
    paramwise_cfg=dict(custom_keys={'backbone': dict(lr_mult=1.0)}))

max_epochs = 16
warmup_iters = 200
train_cfg = dict(max_epochs=max_epochs, val_interval=2)
param_scheduler = [
    dict(type='LinearLR', start_factor=1 / warmup_iters, by_epoch=False, begin=0, end=warmup_iters),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[12], gamma=0.1)
]
