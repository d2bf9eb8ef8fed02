"""What a run runs on: files (local or gs://, written whole), the device mesh and batches
on it, several processes. The bottom layer: it imports no other part of jlora."""
