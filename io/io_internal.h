/* Library-internal parts of the io layer, for the layers that read files through it. Never
 * installed. */
#ifndef QKV_IO_INTERNAL_H
#define QKV_IO_INTERNAL_H

#include "io/io.h"

/* CRC-32 as zlib computes it; start with crc = 0. */
uint32_t qkv__crc32(uint32_t crc, const void *data, size_t n);

/* Puts "<op>: <path>: " before the thread's error if it was recorded since had_error (whether
 * one was pending) was taken and does not name path yet, such as an allocation failure while
 * the file was read: a message about a user's file always says which file. */
void qkv__name_file_in_error(const char *op, const char *path, bool had_error);

/* The file a write to path must replace: path with its symbolic links followed (a link whose
 * target does not exist yet gives that target), in a new qkv__alloc'd string of *size bytes.
 * Writing there keeps the links. NULL with an error naming op and path on failure. */
char *qkv__resolve_links(const char *op, const char *path, size_t *size);
/* Creates "<path>.tmp-<pid>-<n>" for writing, or "<dir>/.qkv-<pid>-<n>.tmp" when that name
 * would be too long, into tmp (strlen(path) + 48 bytes do). It gets the mode of the file it
 * will replace, or that of any new file (0666 less the umask) when there is none. -1 with
 * errno set on failure. */
int qkv__open_temporary(const char *path, char *tmp, size_t size);
/* Removes the temporary files of writers killed during a write into path's directory: those
 * named as qkv__open_temporary names them whose pid is no running process and which have not
 * changed for a minute. Failures are ignored: this is housekeeping. */
void qkv__remove_stale_temporaries(const char *path);

/* The file's path, as given to qkv_safetensors_read. */
const char *qkv__safetensors_path(const qkv_safetensors *f);
/* The shape and the qkv dtype of tensor `name` as read; false when the file has none. */
bool qkv__safetensors_info(const qkv_safetensors *f, const char *name, int *ndim,
                           int64_t *shape, qkv_dtype *dtype);
/* Whether `name` was saved as an extra (qkv_checkpoint_contents), not as module state. */
bool qkv__safetensors_is_extra(const qkv_safetensors *f, const char *name);

#endif
