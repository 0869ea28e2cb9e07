//! CUDA backend: kernels from `kernels/`, loaded lazily, driven through cudarc (see the kernels issue).
