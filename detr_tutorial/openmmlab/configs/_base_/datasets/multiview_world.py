# The book's synthetic multi-camera world (detr_tutorial.data.multiview), the 'detr3d_live' split: 2400 training
# scenes (seed 0), 200 held-out ones (seed 1), 6 cameras of 64 x 112 pixels, 2 to 8 boxes of 3 classes 3-20 m away.
# Registered by the DETR3D plugin (detr_tutorial/openmmlab/detr3d_plugin/), which a config using this file imports.
dataset_type = 'MultiViewWorld'
class_names = ['car', 'truck', 'pedestrian']
world = dict(num_cams=6, image_hw=(64, 112), min_objects=2, max_objects=8, distance=(3.0, 20.0))

train_dataloader = dict(
    batch_size=4,
    num_workers=0,
    drop_last=True,
    sampler=dict(type='RandomSampler', skip_draws=1),  # the engine's shuffle (and TrainRNGHook)
    collate_fn=dict(type='detr_tutorial.multiview_collate'),
    dataset=dict(type=dataset_type, num_scenes=2400, seed=0, **world))
val_dataloader = dict(
    batch_size=16,  # the engine's multi-view validation batches
    num_workers=0,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='detr_tutorial.multiview_collate'),
    dataset=dict(type=dataset_type, num_scenes=200, seed=1, **world))
test_dataloader = val_dataloader

val_evaluator = dict(type='NuScenesMetric', classes=class_names)
test_evaluator = val_evaluator
