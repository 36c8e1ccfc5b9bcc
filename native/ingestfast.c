/*
 * neon._ingestfast: the WAL ingest fast lane (a CPython extension).
 *
 * Most WAL records need nothing from the pageserver but "store this record under every block it
 * references" (spec pageserver §4.4): heap and index records of an ongoing transaction whose
 * blocks lie inside relations of known size. ingest_simple() takes a run of such records and
 * appends their values straight to the in-memory layer's index, exactly as the Python path
 * (neon/pageserver/walingest.py) would. It stops at the first record that is not that simple —
 * another resource manager with its own handling, a heap record that clears VM bits, a new xid,
 * a block beyond the cached relation size, or anything unusual in the record's headers — and
 * the Python path takes that record (and reports any error in it).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stddef.h>
#include <string.h>

#define XLOG_RECORD_SIZE 24
#define BLOCK_ID_DATA_SHORT 255
#define BLOCK_ID_DATA_LONG 254
#define BLOCK_ID_ORIGIN 253
#define BLOCK_ID_TOPLEVEL_XID 252
#define MAX_BLOCK_ID 32
#define BKPBLOCK_FORK_MASK 0x0F
#define BKPBLOCK_HAS_IMAGE 0x10
#define BKPBLOCK_HAS_DATA 0x20
#define BKPBLOCK_WILL_INIT 0x40
#define BKPBLOCK_SAME_REL 0x80
#define BKPIMAGE_HAS_HOLE 0x01
#define BKPIMAGE_APPLY 0x02
#define BKPIMAGE_COMPRESSED 0x1C
#define BLCKSZ 8192

#define RM_HEAP2_ID 9
#define RM_HEAP_ID 10

/* Value::WalRecord(NeonWalRecord::Postgres { will_init, rec }) in bincode BE: u32 1, u32 0, u8, u64 len. */
#define VALUE_HEADER_SIZE 17

typedef struct {
    uint32_t spc, db, rel, blk;
    uint8_t fork, will_init;
} block_ref;

static inline uint16_t rd16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

/* Resource managers whose records the pageserver interprets (walingest.py dispatches on them). */
static int rmgr_is_special(uint8_t rmid) {
    switch (rmid) {
    case 0:  /* XLOG */
    case 1:  /* XACT */
    case 2:  /* SMGR */
    case 3:  /* CLOG */
    case 4:  /* DBASE */
    case 6:  /* MULTIXACT */
    case 7:  /* RELMAP */
    case 21: /* LOGICALMSG */
        return 1;
    default:
        return rmid >= 128; /* custom resource managers: leave them to Python */
    }
}

/* Whether a heap record may clear visibility-map bits (the flag bytes of walingest._VM_FLAG_BYTES). */
static int heap_may_clear_vm(uint8_t rmid, uint8_t info, const uint8_t *main, uint32_t main_len) {
    int off = -1, mask = 0;
    uint8_t op = info & 0x70;
    if (rmid == RM_HEAP_ID) {
        switch (op) {
        case 0x00: off = 2; mask = 0x01; break;
        case 0x10: off = 7; mask = 0x01; break;
        case 0x20: case 0x40: off = 7; mask = 0x03; break;
        case 0x60: off = 7; mask = 0x01; break;
        default: return 0;
        }
    } else {
        switch (op) {
        case 0x50: off = 0; mask = 0x01; break;
        case 0x60: off = 7; mask = 0x01; break;
        default: return 0;
        }
    }
    if ((uint32_t)off >= main_len)
        return 1;
    return (main[off] & mask) != 0;
}

/* Parse the block references; 1 = a plain record with n blocks, 0 = leave it to Python. */
static int parse_blocks(const uint8_t *rec, Py_ssize_t len, block_ref *blocks, int *nblocks,
                        uint32_t *main_off, uint32_t *main_len) {
    uint32_t tot_len = rd32(rec);
    if (len < XLOG_RECORD_SIZE || tot_len != (uint64_t)len)
        return 0;
    uint64_t pos = XLOG_RECORD_SIZE, payload = 0, mlen = 0;
    int n = 0, last_id = -1, have_rel = 0;
    uint32_t spc = 0, db = 0, rel = 0;
    while (pos < tot_len - payload) {
        uint8_t id = rec[pos++];
        if (id == BLOCK_ID_DATA_SHORT) {
            if (pos + 1 > tot_len) return 0;
            mlen = rec[pos];
            pos += 1;
            break;
        }
        if (id == BLOCK_ID_DATA_LONG) {
            if (pos + 4 > tot_len) return 0;
            mlen = rd32(rec + pos);
            pos += 4;
            break;
        }
        if (id == BLOCK_ID_ORIGIN) { pos += 2; continue; }
        if (id == BLOCK_ID_TOPLEVEL_XID) { pos += 4; continue; }
        if (id > MAX_BLOCK_ID || (int)id <= last_id || n > MAX_BLOCK_ID) return 0;
        last_id = id;
        if (pos + 3 > tot_len) return 0;
        uint8_t flags = rec[pos];
        uint16_t data_len = rd16(rec + pos + 1);
        pos += 3;
        if ((flags & BKPBLOCK_HAS_DATA) ? data_len == 0 : data_len != 0) return 0;
        payload += data_len;
        uint8_t apply = 0;
        if (flags & BKPBLOCK_HAS_IMAGE) {
            if (pos + 5 > tot_len) return 0;
            uint16_t img_len = rd16(rec + pos);
            uint8_t bimg_info = rec[pos + 4];
            pos += 5;
            if ((bimg_info & BKPIMAGE_HAS_HOLE) && (bimg_info & BKPIMAGE_COMPRESSED)) pos += 2;
            if (img_len == 0) return 0;
            payload += img_len;
            apply = (bimg_info & BKPIMAGE_APPLY) != 0;
        }
        if (flags & BKPBLOCK_SAME_REL) {
            if (!have_rel || pos + 4 > tot_len) return 0;
            blocks[n].blk = rd32(rec + pos);
            pos += 4;
        } else {
            if (pos + 16 > tot_len) return 0;
            spc = rd32(rec + pos);
            db = rd32(rec + pos + 4);
            rel = rd32(rec + pos + 8);
            blocks[n].blk = rd32(rec + pos + 12);
            pos += 16;
            have_rel = 1;
        }
        blocks[n].spc = spc;
        blocks[n].db = db;
        blocks[n].rel = rel;
        blocks[n].fork = flags & BKPBLOCK_FORK_MASK;
        blocks[n].will_init = (flags & BKPBLOCK_WILL_INIT) || apply;
        if (blocks[n].blk == 0xFFFFFFFFu || rel == 0) return 0;
        n++;
    }
    if (pos + payload + mlen != tot_len) return 0;
    *nblocks = n;
    *main_off = (uint32_t)(tot_len - mlen);
    *main_len = (uint32_t)mlen;
    return 1;
}

/* The cached size of a fork if a block below it may be stored without extension, else -1. */
static long long cached_size(PyObject *sizes, const block_ref *b, unsigned long long lsn) {
    PyObject *tag = Py_BuildValue("(IIIB)", b->spc, b->db, b->rel, b->fork);
    if (tag == NULL) return -2;
    PyObject *entry = PyDict_GetItemWithError(sizes, tag); /* borrowed */
    Py_DECREF(tag);
    if (entry == NULL)
        return PyErr_Occurred() ? -2 : -1;
    if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 2) return -1;
    unsigned long long at = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(entry, 0));
    long long n = PyLong_AsLongLong(PyTuple_GET_ITEM(entry, 1));
    if (PyErr_Occurred()) return -2;
    if (lsn < at) return -1;
    return n;
}

static PyObject *make_key(const block_ref *b) {
    uint8_t k[18];
    k[0] = 0;
    uint32_t v[4] = {b->spc, b->db, b->rel, 0};
    for (int i = 0; i < 3; i++) {
        k[1 + 4 * i] = (uint8_t)(v[i] >> 24);
        k[2 + 4 * i] = (uint8_t)(v[i] >> 16);
        k[3 + 4 * i] = (uint8_t)(v[i] >> 8);
        k[4 + 4 * i] = (uint8_t)v[i];
    }
    k[13] = b->fork;
    k[14] = (uint8_t)(b->blk >> 24);
    k[15] = (uint8_t)(b->blk >> 16);
    k[16] = (uint8_t)(b->blk >> 8);
    k[17] = (uint8_t)b->blk;
    return PyBytes_FromStringAndSize((const char *)k, 18);
}

static PyObject *make_value(const uint8_t *rec, Py_ssize_t len, int will_init) {
    PyObject *v = PyBytes_FromStringAndSize(NULL, VALUE_HEADER_SIZE + len);
    if (v == NULL) return NULL;
    uint8_t *p = (uint8_t *)PyBytes_AS_STRING(v);
    memset(p, 0, VALUE_HEADER_SIZE);
    p[3] = 1; /* Value::WalRecord; then NeonWalRecord::Postgres = 0 */
    p[8] = will_init ? 1 : 0;
    uint64_t n = (uint64_t)len;
    for (int i = 0; i < 8; i++) p[9 + i] = (uint8_t)(n >> (56 - 8 * i));
    memcpy(p + VALUE_HEADER_SIZE, rec, len);
    return v;
}

/*
 * ingest_simple(records, start, index, sizes, last_xid, last_lsn)
 *   records: list of (start_lsn, end_lsn, raw bytes); processing begins at records[start]
 *   index:   the in-memory layer's dict key -> list of (lsn, will_init, value)
 *   sizes:   the timeline's rel-size cache, RelTag -> (lsn, nblocks)
 * Returns (n_done, value_bytes, n_values, last_end, prev_end): the records consumed, what was
 * added to the layer, and the end LSNs of the last two consumed records (0 when fewer).
 */
static PyObject *ingest_simple(PyObject *self, PyObject *args) {
    PyObject *records, *index, *sizes;
    Py_ssize_t start;
    unsigned long long last_xid, last_lsn;
    if (!PyArg_ParseTuple(args, "O!nO!O!KK", &PyList_Type, &records, &start, &PyDict_Type, &index, &PyDict_Type,
                          &sizes, &last_xid, &last_lsn))
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(records);
    Py_ssize_t i = start;
    unsigned long long value_bytes = 0, n_values = 0, last_end = 0, prev_end = 0;
    block_ref blocks[MAX_BLOCK_ID + 1];
    for (; i < count; i++) {
        PyObject *item = PyList_GET_ITEM(records, i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 3) break;
        unsigned long long end = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(item, 1));
        if (PyErr_Occurred()) return NULL;
        PyObject *raw = PyTuple_GET_ITEM(item, 2);
        if (!PyBytes_Check(raw)) break;
        const uint8_t *rec = (const uint8_t *)PyBytes_AS_STRING(raw);
        Py_ssize_t len = PyBytes_GET_SIZE(raw);
        if (end <= last_lsn || (end & 7) || len < XLOG_RECORD_SIZE) break;
        uint32_t xid = rd32(rec + 4);
        uint8_t info = rec[16], rmid = rec[17];
        if (xid != last_xid || rmgr_is_special(rmid)) break;
        int nblocks = 0;
        uint32_t main_off = 0, main_len = 0;
        if (!parse_blocks(rec, len, blocks, &nblocks, &main_off, &main_len)) break;
        if ((rmid == RM_HEAP_ID || rmid == RM_HEAP2_ID) && nblocks > 0 &&
            heap_may_clear_vm(rmid, info, rec + main_off, main_len))
            break;
        /* Every block must be inside a relation of known size, and no block may appear twice (one
         * value per key and LSN): check all before changing anything. */
        int ok = 1;
        for (int b = 1; b < nblocks && ok; b++)
            for (int c = 0; c < b; c++)
                if (memcmp(&blocks[b], &blocks[c], offsetof(block_ref, will_init)) == 0) { ok = 0; break; }
        if (!ok) break;
        for (int b = 0; b < nblocks; b++) {
            long long n = cached_size(sizes, &blocks[b], end);
            if (n == -2) return NULL;
            if (n < 0 || (long long)blocks[b].blk >= n) { ok = 0; break; }
        }
        if (!ok) break;
        PyObject *vals[2] = {NULL, NULL};
        PyObject *lsn_obj = PyLong_FromUnsignedLongLong(end);
        if (lsn_obj == NULL) return NULL;
        for (int b = 0; b < nblocks; b++) {
            int init = blocks[b].will_init ? 1 : 0;
            if (vals[init] == NULL && (vals[init] = make_value(rec, len, init)) == NULL) goto fail;
            PyObject *key = make_key(&blocks[b]);
            if (key == NULL) goto fail;
            PyObject *entry = PyTuple_Pack(3, lsn_obj, init ? Py_True : Py_False, vals[init]);
            if (entry == NULL) { Py_DECREF(key); goto fail; }
            PyObject *versions = PyDict_GetItemWithError(index, key); /* borrowed */
            int rc;
            if (versions != NULL) {
                rc = PyList_Append(versions, entry);
            } else if (PyErr_Occurred()) {
                rc = -1;
            } else {
                PyObject *list = PyList_New(1);
                if (list == NULL) { rc = -1; }
                else {
                    Py_INCREF(entry);
                    PyList_SET_ITEM(list, 0, entry);
                    rc = PyDict_SetItem(index, key, list);
                    Py_DECREF(list);
                }
            }
            Py_DECREF(entry);
            Py_DECREF(key);
            if (rc < 0) goto fail;
            value_bytes += (unsigned long long)(VALUE_HEADER_SIZE + len);
            n_values++;
        }
        Py_XDECREF(vals[0]);
        Py_XDECREF(vals[1]);
        Py_DECREF(lsn_obj);
        prev_end = last_end;
        last_end = end;
        last_lsn = end;
        continue;
    fail:
        Py_XDECREF(vals[0]);
        Py_XDECREF(vals[1]);
        Py_DECREF(lsn_obj);
        return NULL;
    }
    return Py_BuildValue("nKKKK", i - start, value_bytes, n_values, last_end, prev_end);
}

/*
 * encode_versions(key, versions, start, data, data_len, lo, hi, raw_limit, payload_size, keys, refs)
 *
 * The inner loop of a delta layer flush (neon/pageserver/layers/layer_file.py append_versions):
 * for versions[start:], (lsn, will_init, value) with strictly increasing LSNs in [lo, hi), append
 * each value's blob (1-byte header below 128 bytes, else the 4-byte long header with the length)
 * to `data`, padding so that no header straddles a block payload, and its index key and reference
 * to `keys` and `refs`. Stops at the first value of `raw_limit` bytes or more (Python compresses
 * those). Returns (next index, data_len, raw bytes, previous LSN); an LSN out of order or range is
 * a ValueError.
 */
static PyObject *encode_versions(PyObject *self, PyObject *args) {
    PyObject *key, *versions, *data, *keys, *refs;
    Py_ssize_t start;
    unsigned long long data_len, lo, hi, prev_in;
    long long prev;
    Py_ssize_t raw_limit, payload_size;
    if (!PyArg_ParseTuple(args, "SO!nYKKKKnnO!O!", &key, &PyList_Type, &versions, &start, &data, &data_len, &lo, &hi,
                          &prev_in, &raw_limit, &payload_size, &PyList_Type, &keys, &PyList_Type, &refs))
        return NULL;
    if (PyBytes_GET_SIZE(key) != 18 || payload_size < 8) {
        PyErr_SetString(PyExc_ValueError, "encode_versions: bad key or payload size");
        return NULL;
    }
    prev = (long long)prev_in - 1; /* prev_in is "previous LSN + 1" so that 0 means none */
    const char *k = PyBytes_AS_STRING(key);
    Py_ssize_t n = PyList_GET_SIZE(versions), i = start;
    unsigned long long raw_bytes = 0;
    for (; i < n; i++) {
        PyObject *v = PyList_GET_ITEM(versions, i);
        if (!PyTuple_Check(v) || PyTuple_GET_SIZE(v) != 3) {
            PyErr_SetString(PyExc_TypeError, "versions must be (lsn, will_init, value) tuples");
            return NULL;
        }
        PyObject *value = PyTuple_GET_ITEM(v, 2);
        if (!PyBytes_Check(value)) break; /* let Python handle other buffer types */
        Py_ssize_t len = PyBytes_GET_SIZE(value);
        if (len >= raw_limit) break;
        unsigned long long lsn = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(v, 0));
        if (PyErr_Occurred()) return NULL;
        int init = PyObject_IsTrue(PyTuple_GET_ITEM(v, 1));
        if (init < 0) return NULL;
        if (!((long long)lsn > prev && lsn >= lo && lsn < hi)) {
            PyErr_Format(PyExc_ValueError, "LSN %llX of a delta key out of order or outside %llX..%llX", lsn, lo, hi);
            return NULL;
        }
        prev = (long long)lsn;
        uint8_t header[4];
        Py_ssize_t hlen;
        if (len <= 0x7F) {
            header[0] = (uint8_t)len;
            hlen = 1;
        } else {
            uint32_t h = 0x80000000u | (uint32_t)len;
            header[0] = (uint8_t)(h >> 24); header[1] = (uint8_t)(h >> 16);
            header[2] = (uint8_t)(h >> 8); header[3] = (uint8_t)h;
            hlen = 4;
        }
        Py_ssize_t room = payload_size - (Py_ssize_t)(data_len % (unsigned long long)payload_size);
        Py_ssize_t pad = room < 4 ? room : 0;
        Py_ssize_t old = PyByteArray_GET_SIZE(data);
        if (PyByteArray_Resize(data, old + pad + hlen + len) < 0) return NULL;
        char *dst = PyByteArray_AS_STRING(data) + old;
        memset(dst, 0, pad);
        data_len += pad;
        uint8_t ik[26];
        memcpy(ik, k, 18);
        for (int b = 0; b < 8; b++) ik[18 + b] = (uint8_t)(lsn >> (56 - 8 * b));
        PyObject *ikey = PyBytes_FromStringAndSize((const char *)ik, 26);
        if (ikey == NULL) return NULL;
        PyObject *ref = PyLong_FromUnsignedLongLong((data_len << 1) | (unsigned)init);
        if (ref == NULL) { Py_DECREF(ikey); return NULL; }
        int rc = PyList_Append(keys, ikey) | PyList_Append(refs, ref);
        Py_DECREF(ikey);
        Py_DECREF(ref);
        if (rc < 0) return NULL;
        memcpy(dst + pad, header, hlen);
        memcpy(dst + pad + hlen, PyBytes_AS_STRING(value), len);
        data_len += hlen + len;
        raw_bytes += len;
    }
    return Py_BuildValue("nKKK", i, data_len, raw_bytes, (unsigned long long)(prev + 1));
}

static PyMethodDef methods[] = {
    {"ingest_simple", ingest_simple, METH_VARARGS, "Store a run of plain block records into an in-memory layer."},
    {"encode_versions", encode_versions, METH_VARARGS, "Append a delta key's raw values as blobs."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_ingestfast", NULL, -1, methods};

PyMODINIT_FUNC PyInit__ingestfast(void) { return PyModule_Create(&module); }
