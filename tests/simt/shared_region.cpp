// The emulated dynamic shared memory (extern __shared__ on a GPU): a zero-initialized global that
// build.py moves into the "simt_shared" section with the kernel files' static shared arrays, so
// that it is poisoned before every block and addressable by wgmma descriptors like them.
alignas(128) unsigned char simt_dynamic_shared_region[96 * 1024];
