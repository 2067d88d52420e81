"""Background jobs on JetStream: commands to one worker pool, with a lifecycle and a result.

`@service.job(...)` declares a kind (`worker`), `client.enqueue(...)` records and queues
a job (`enqueue`, `control`), `JobHandle` reads and watches its status record
(`handle`, `store`, `status`), delays and recurring jobs are server message schedules
(`schedule`), rate limits are JetStream counters (`ratelimit`), priorities are one
consumer per priority pulled highest first (`puller`).
"""
