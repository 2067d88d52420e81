"""Background jobs on JetStream: commands to one worker pool, with a lifecycle and a result.

`@service.job(...)` declares a kind (`worker`), `client.enqueue(...)` queues a job
(`enqueue`, `control`: its message is its record until a worker takes it, `messages`),
`JobHandle` reads and watches its status (`handle`, `store`, `status`), workers run it
(`process`, `run`) and record successes in bursts (`settle`), delays and recurring jobs
are server message schedules (`schedule`), rate limits are JetStream counters
(`ratelimit`), priorities are one consumer per priority pulled highest first (`puller`).
"""
