"""Generation: requests, the scheduler's step, the runners that execute a step (native CPU step, PyTorch,
tensor parallel), sampling and the events clients receive. One engine serves every client."""
