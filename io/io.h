/*
 * qkv file formats: safetensors reading and writing, shared by every layer that saves (module
 * checkpoints in nn.h, training checkpoints in optim.h, whatever a program saves beside them).
 * Results and errors follow tensor.h's conventions: tensors read belong to the innermost scope,
 * errors return NULL or false with qkv_error() set.
 *
 * Files are safetensors: an 8-byte little-endian header length, a JSON header of name ->
 * {dtype, shape, data_offsets} plus string "__metadata__", then raw little-endian data, so
 * PyTorch (safetensors, or plain json + struct) reads what qkv writes and the other way round.
 * A write goes to a temporary file beside the target, is synced, and is renamed over it: an
 * interrupted save leaves the previous file whole. A symbolic link is written through: its
 * target is replaced and the link stays. Each write first removes the temporary files that
 * killed writers left in the directory (their pid gone, unchanged for a minute).
 *
 * qkv's files carry a CRC-32 of every byte of the file but its own 8 hex digits (header and
 * data) in the metadata key "qkv.checksum", and "qkv.format": "2", which makes the checksum
 * required; both are verified on read. Files of other writers carry neither and are
 * accepted; qkv's files from before format 2 have a CRC-32 of the data alone and no
 * qkv.format, and load with that checked. Keys starting with "qkv." are the library's own.
 */
#ifndef QKV_IO_H
#define QKV_IO_H

#include "tensor/tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Named tensors in order, as a module lists its state (qkv_module_state, qkv_named_list_free
 * in nn.h) and as qkv_safetensors_write takes them. */
typedef struct qkv_named_list {
    int n;
    char **names;
    qkv_tensor **tensors;
} qkv_named_list;

typedef struct qkv_meta_pair {
    const char *key, *value;     /* UTF-8 strings, saved in __metadata__ */
} qkv_meta_pair;

typedef struct qkv_named_bytes {
    const char *name;            /* saved as a 1-D U8 tensor of that name */
    const void *data;
    size_t size;
} qkv_named_bytes;

/* What a checkpoint holds beside a module's state: extra tensors (optimizer moments, say),
 * byte blobs (a vocabulary), and metadata strings (a configuration). Any count may be 0. */
typedef struct qkv_checkpoint_contents {
    int n_tensors;
    const char *const *tensor_names;
    qkv_tensor *const *tensors;
    int n_bytes;
    const qkv_named_bytes *bytes;
    int n_meta;
    const qkv_meta_pair *meta;
} qkv_checkpoint_contents;

/* Writes tensors (in order; any dtype, any strides) and extras to path atomically. Names are
 * non-empty UTF-8 without control characters and unique. */
bool qkv_safetensors_write(const char *path, const qkv_named_list *tensors,
                           const qkv_checkpoint_contents *extras);

/* Whether a write of about size bytes to path can succeed, as far as can be told before it:
 * path is no directory, and its directory takes a new file of that size (made, given its
 * room, and removed again). Links are followed as a write follows them. For a program that
 * saves after hours of work, to check before the work. False with an error naming path
 * otherwise ("No such file or directory", "Permission denied", "No space left on device"). */
bool qkv_safetensors_writable(const char *path, size_t size);

/* A safetensors file read and checked: the header length, the JSON (UTF-8, strings and
 * integers only where the format has them), dtypes, shapes whose sizes must agree with the
 * offsets, offsets that tile the data exactly, unique names, and the checksum. Any problem is
 * an error naming the file (and the header byte, for JSON). Dtypes read as qkv dtypes: F32,
 * F64, I64, BOOL, BF16 as themselves; F16 as F32; U8, I8, I16, U16, I32, U32 as I64. */
typedef struct qkv_safetensors qkv_safetensors;
qkv_safetensors *qkv_safetensors_read(const char *path);
/* The same from a copy of size bytes in memory; name stands for the path in messages. */
qkv_safetensors *qkv_safetensors_from_bytes(const void *data, size_t size, const char *name);
void qkv_safetensors_free(qkv_safetensors *f);              /* NULL is ignored */
int qkv_safetensors_count(const qkv_safetensors *f);        /* tensors, in header order */
const char *qkv_safetensors_name(const qkv_safetensors *f, int i);
/* The dimensions of tensor `name` (its shape into shape), or -1 (no error) when the file has
 * none; nothing is allocated, so a loader checks a file's shapes before it builds by them. */
int qkv_safetensors_shape(const qkv_safetensors *f, const char *name,
                          int64_t shape[QKV_MAX_DIMS]);
/* A new tensor (in the innermost scope) with the values of tensor `name`. */
qkv_tensor *qkv_safetensors_tensor(const qkv_safetensors *f, const char *name);
/* The bytes of the 1-D U8 tensor `name` (valid until the file is freed); NULL if none. */
const void *qkv_safetensors_bytes(const qkv_safetensors *f, const char *name, size_t *size);
/* The metadata value of key, or NULL (no error) when the file has none. */
const char *qkv_safetensors_meta(const qkv_safetensors *f, const char *key);
int qkv_safetensors_meta_count(const qkv_safetensors *f);
const char *qkv_safetensors_meta_key(const qkv_safetensors *f, int i);

/* Test switch: checkpoint writes fail (as with a full disk) once nbytes have been written;
 * 0 turns it off. */
void qkv_debug_fail_write_after(size_t nbytes);

#ifdef __cplusplus
}
#endif
#endif
