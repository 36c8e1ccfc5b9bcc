/*
 * walredo_apply.c
 *	  The page-reconstruction messages of neon_walredo.
 *
 * One request reconstructs one block (the "target"):
 *
 *	 B <tag>			  start; forget anything left from an earlier request
 *	 P <tag> <page>		  base image of the target (optional)
 *	 A <end lsn> <record> apply one WAL record (any number of them)
 *	 G <tag>			  return the target page, then drop all state
 *
 * Stock PostgreSQL has no hook to tell XLogReadBufferForRedo() which blocks
 * to skip, so we steer the ordinary redo routines with the buffer cache and
 * the smgr size cache instead:
 *
 * - Sizes.  During recovery smgrnblocks() answers from smgr_cached_nblocks
 *	 when it is set.  Every fork a record references is made to look at least
 *	 blkno+1 blocks long, and the FSM and visibility-map forks look huge, so
 *	 XLogReadBufferExtended() never tries to extend a file block by block and
 *	 never reports a block as missing.  Those forks' files are created (empty)
 *	 so that buffer reads of them return zero pages.
 *
 * - Sentinels.  A block the record references that is not the target, and
 *	 that the record neither initialises nor restores from an image, gets a
 *	 "sentinel" page in the buffer cache just before the record is applied:
 *	 an empty initialised page whose LSN is all ones.  The redo routine then
 *	 sees BLK_DONE for it and leaves it alone.  After the record the
 *	 sentinels are checked and reset if anything touched them.
 *
 * - Cleanup.  After GetPage every buffer of every relation the request
 *	 touched is dropped without being written.  Normally nothing reaches the
 *	 files at all; if some buffer was written out (eviction, or an init fork
 *	 flush), the touched relations' files are unlinked so that no stale data
 *	 can be read by a later request.
 */
#include "postgres.h"

#include "access/xlog.h"
#include "access/xlog_internal.h"
#include "access/xlogreader.h"
#include "access/xlogrecord.h"
#include "access/xlogrecovery.h"
#include "access/xlogutils.h"
#include "common/relpath.h"
#include "executor/instrument.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "port/pg_bswap.h"
#include "port/pg_crc32c.h"
#include "storage/bufmgr.h"
#include "storage/bufpage.h"
#include "storage/md.h"
#include "storage/smgr.h"
#include "storage/sync.h"
#include "utils/memutils.h"

#include "neon_walredo.h"

/* "Size" given to forks whose real size we do not track (FSM, VM). */
#define HUGE_NBLOCKS	MaxBlockNumber

/* Page LSN of a sentinel: no record can be newer. */
#define SENTINEL_LSN	((XLogRecPtr) UINT64CONST(0xFFFFFFFFFFFFFFFF))

/* State of the current request. */
static bool in_request = false;
static WalRedoTag target;
static bool target_valid;		/* target buffer holds a page to build on */
static bool target_pushed;		/* ... because of a PushPage */
static int	request_nrecords;
static XLogRecPtr request_first_lsn;
static XLogRecPtr request_last_lsn;
static int64 written_at_begin;	/* pgBufferUsage.shared_blks_written */

/* Relations whose buffers must be dropped at the end of the request. */
static RelFileNode *touched = NULL;
static int	ntouched = 0;
static int	maxtouched = 0;

/* Blocks of the record being applied that carry a sentinel. */
static WalRedoTag sentinels[XLR_MAX_BLOCK_ID + 1];
static int	nsentinels = 0;

static PGAlignedBlock sentinel_page;

/* WAL decoding */
static XLogReaderState *reader = NULL;
static DecodedXLogRecord *decode_buf = NULL;
static Size decode_buf_size = 0;

static void end_request(void);


void
walredo_apply_init(void)
{
	for (int rmid = 0; rmid <= RM_MAX_ID; rmid++)
	{
		if (RmgrIdExists(rmid) && RmgrTable[rmid].rm_startup != NULL)
			RmgrTable[rmid].rm_startup();
	}

	reader = XLogReaderAllocate(wal_segment_size, NULL,
								XL_ROUTINE(.page_read = NULL,
										   .segment_open = NULL,
										   .segment_close = NULL),
								NULL);
	if (reader == NULL)
		ereport(FATAL,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory"),
				 errdetail("Failed while allocating a WAL reading processor.")));

	PageInit((Page) sentinel_page.data, BLCKSZ, 0);
	PageSetLSN((Page) sentinel_page.data, SENTINEL_LSN);

	maxtouched = 16;
	touched = MemoryContextAlloc(TopMemoryContext, sizeof(RelFileNode) * maxtouched);
}

/* ---------------------------------------------------------------------
 * Helpers
 * ---------------------------------------------------------------------
 */

static inline bool
tags_equal(const WalRedoTag *a, const WalRedoTag *b)
{
	return RelFileNodeEquals(a->rnode, b->rnode) &&
		a->forknum == b->forknum && a->blkno == b->blkno;
}

static const char *
fork_name(ForkNumber forknum)
{
	if (forknum >= 0 && forknum <= MAX_FORKNUM)
		return forkNames[forknum];
	return "?";
}

/* Parse a 17-byte buffer tag (fork u8, spc, db, rel, blk as u32 BE). */
static void
parse_tag(const char *p, WalRedoTag *tag)
{
	uint32		v[4];
	uint8		fork = (uint8) p[0];

	memcpy(v, p + 1, sizeof(v));
	tag->rnode.spcNode = pg_ntoh32(v[0]);
	tag->rnode.dbNode = pg_ntoh32(v[1]);
	tag->rnode.relNode = pg_ntoh32(v[2]);
	tag->blkno = pg_ntoh32(v[3]);
	if (fork > MAX_FORKNUM)
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("neon_walredo: invalid fork number %u in buffer tag", fork)));
	tag->forknum = (ForkNumber) fork;
	if (tag->blkno == InvalidBlockNumber)
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("neon_walredo: invalid block number in buffer tag")));
}

static void
check_length(const char *what, int len, int expected)
{
	if (len != expected)
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("neon_walredo: %s message has a payload of %d bytes, expected %d",
						what, len, expected)));
}

static void
remember_touched(RelFileNode rnode)
{
	for (int i = 0; i < ntouched; i++)
	{
		if (RelFileNodeEquals(touched[i], rnode))
			return;
	}
	if (ntouched == maxtouched)
	{
		maxtouched *= 2;
		touched = repalloc(touched, sizeof(RelFileNode) * maxtouched);
	}
	touched[ntouched++] = rnode;
}

/*
 * Open a relation at smgr level for this request.  The first time we see it
 * (in this SMgrRelation's lifetime) its FSM and VM forks get their files and
 * a huge cached size, and the other forks a cached size of at least zero, so
 * that neither redo nor DropRelFileNodesAllBuffers() ever asks the kernel.
 */
static SMgrRelation
prepare_relation(RelFileNode rnode)
{
	SMgrRelation reln = smgropen(rnode, InvalidBackendId);

	if (reln->smgr_cached_nblocks[VISIBILITYMAP_FORKNUM] != HUGE_NBLOCKS)
	{
		smgrcreate(reln, MAIN_FORKNUM, true);
		smgrcreate(reln, FSM_FORKNUM, true);
		smgrcreate(reln, VISIBILITYMAP_FORKNUM, true);
		reln->smgr_cached_nblocks[FSM_FORKNUM] = HUGE_NBLOCKS;
		reln->smgr_cached_nblocks[VISIBILITYMAP_FORKNUM] = HUGE_NBLOCKS;
		if (reln->smgr_cached_nblocks[MAIN_FORKNUM] == InvalidBlockNumber)
			reln->smgr_cached_nblocks[MAIN_FORKNUM] = 0;
		if (reln->smgr_cached_nblocks[INIT_FORKNUM] == InvalidBlockNumber)
			reln->smgr_cached_nblocks[INIT_FORKNUM] = 0;
	}
	remember_touched(rnode);
	return reln;
}

/* Make a fork exist and look at least blkno+1 blocks long. */
static void
cover_block(SMgrRelation reln, ForkNumber forknum, BlockNumber blkno)
{
	BlockNumber *cached = &reln->smgr_cached_nblocks[forknum];

	smgrcreate(reln, forknum, true);	/* no-op once the fork is open */
	if (*cached == InvalidBlockNumber || *cached <= blkno)
		*cached = (blkno >= HUGE_NBLOCKS) ? HUGE_NBLOCKS : blkno + 1;
}

/*
 * Put a sentinel page into the buffer for a block, unless it already holds
 * one.  RBM_ZERO_AND_LOCK never reads the file.
 */
static void
install_sentinel(const WalRedoTag *tag)
{
	Buffer		buf;
	Page		page;

	buf = ReadBufferWithoutRelcache(tag->rnode, tag->forknum, tag->blkno,
									RBM_ZERO_AND_LOCK, NULL, true);
	page = BufferGetPage(buf);
	if (memcmp(page, sentinel_page.data, BLCKSZ) != 0)
	{
		memcpy(page, sentinel_page.data, BLCKSZ);
		MarkBufferDirty(buf);
	}
	UnlockReleaseBuffer(buf);
}

/* Error context: which record was being applied. */
static void
apply_error_callback(void *arg)
{
	XLogReaderState *record = (XLogReaderState *) arg;
	StringInfoData buf;

	if (record->record == NULL)
		return;

	initStringInfo(&buf);
	xlog_outdesc(&buf, record);
	for (int block_id = 0; block_id <= XLogRecMaxBlockId(record); block_id++)
	{
		RelFileNode rnode;
		ForkNumber	forknum;
		BlockNumber blkno;

		if (!XLogRecGetBlockTagExtended(record, block_id, &rnode, &forknum, &blkno, NULL))
			continue;
		appendStringInfo(&buf, "; blkref #%d: rel %u/%u/%u fork %s blk %u%s%s",
						 block_id, rnode.spcNode, rnode.dbNode, rnode.relNode,
						 fork_name(forknum), blkno,
						 XLogRecBlockImageApply(record, block_id) ? " FPW" : "",
						 (XLogRecGetBlock(record, block_id)->flags & BKPBLOCK_WILL_INIT) ? " WILL_INIT" : "");
	}
	errcontext("WAL redo of the record ending at %X/%X: %s",
			   LSN_FORMAT_ARGS(record->EndRecPtr), buf.data);
	pfree(buf.data);
}

/* ---------------------------------------------------------------------
 * Messages
 * ---------------------------------------------------------------------
 */

/* 'B': tag */
void
walredo_begin(const char *payload, int len)
{
	SMgrRelation reln;

	check_length("BeginRedoForBlock", len, WALREDO_TAG_SIZE);

	/* A request abandoned without GetPage: throw its state away first. */
	if (in_request)
		end_request();

	parse_tag(payload, &target);
	in_request = true;
	target_valid = false;
	target_pushed = false;
	request_nrecords = 0;
	request_first_lsn = request_last_lsn = InvalidXLogRecPtr;
	written_at_begin = pgBufferUsage.shared_blks_written;

	reln = prepare_relation(target.rnode);
	cover_block(reln, target.forknum, target.blkno);
}

/* 'P': tag + page */
void
walredo_push_page(const char *payload, int len)
{
	WalRedoTag	tag;
	Buffer		buf;

	check_length("PushPage", len, WALREDO_TAG_SIZE + BLCKSZ);
	if (!in_request)
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("neon_walredo: PushPage without BeginRedoForBlock")));
	parse_tag(payload, &tag);
	if (!tags_equal(&tag, &target))
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("neon_walredo: PushPage for block %u/%u/%u fork %s blk %u, but the target is %u/%u/%u fork %s blk %u",
						tag.rnode.spcNode, tag.rnode.dbNode, tag.rnode.relNode,
						fork_name(tag.forknum), tag.blkno,
						target.rnode.spcNode, target.rnode.dbNode, target.rnode.relNode,
						fork_name(target.forknum), target.blkno)));

	buf = ReadBufferWithoutRelcache(tag.rnode, tag.forknum, tag.blkno,
									RBM_ZERO_AND_LOCK, NULL, true);
	memcpy(BufferGetPage(buf), payload + WALREDO_TAG_SIZE, BLCKSZ);
	MarkBufferDirty(buf);
	UnlockReleaseBuffer(buf);

	target_valid = true;
	target_pushed = true;
}

/* 'A': end LSN u64 BE + the complete XLogRecord */
void
walredo_apply_record(const char *payload, int len)
{
	XLogRecPtr	lsn;
	uint64		netlsn;
	XLogRecord *record;
	uint32		reclen;
	Size		required;
	char	   *errormsg;
	bool		refs_target = false;
	bool		inits_target = false;
	ErrorContextCallback errcallback;

	if (!in_request)
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("neon_walredo: ApplyRecord without BeginRedoForBlock")));
	if (len < (int) (sizeof(uint64) + SizeOfXLogRecord))
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("neon_walredo: ApplyRecord message too short (%d bytes)", len)));

	memcpy(&netlsn, payload, sizeof(netlsn));
	lsn = pg_ntoh64(netlsn);
	/* The payload buffer is MAXALIGNed, so the record after the LSN is too. */
	record = (XLogRecord *) (payload + sizeof(uint64));
	reclen = len - sizeof(uint64);

	if (lsn == InvalidXLogRecPtr)
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("neon_walredo: ApplyRecord with invalid LSN 0/0")));
	if (record->xl_tot_len != reclen)
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("neon_walredo: record length %u does not match message size %u (record ending at %X/%X)",
						record->xl_tot_len, reclen, LSN_FORMAT_ARGS(lsn))));
	if (!RmgrIdExists(record->xl_rmid))
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("neon_walredo: unknown resource manager %u in record ending at %X/%X",
						record->xl_rmid, LSN_FORMAT_ARGS(lsn))));
	if (walredo_verify_crc)
	{
		pg_crc32c	crc;

		INIT_CRC32C(crc);
		COMP_CRC32C(crc, ((char *) record) + SizeOfXLogRecord, reclen - SizeOfXLogRecord);
		COMP_CRC32C(crc, (char *) record, offsetof(XLogRecord, xl_crc));
		FIN_CRC32C(crc);
		if (!EQ_CRC32C(record->xl_crc, crc))
			ereport(ERROR,
					(errcode(ERRCODE_DATA_CORRUPTED),
					 errmsg("neon_walredo: incorrect CRC in record ending at %X/%X",
							LSN_FORMAT_ARGS(lsn))));
	}

	/* Decode into our own buffer, the way XLogReadRecord() would. */
	required = DecodeXLogRecordRequiredSpace(reclen);
	if (required > decode_buf_size)
	{
		Size		want = Max(decode_buf_size, (Size) 64 * 1024);

		while (want < required)
			want *= 2;
		if (decode_buf)
			pfree(decode_buf);
		decode_buf = MemoryContextAllocExtended(TopMemoryContext, want, MCXT_ALLOC_HUGE);
		decode_buf_size = want;
	}
	decode_buf->oversized = false;
	reader->record = NULL;
	reader->ReadRecPtr = lsn;
	reader->EndRecPtr = lsn;
	reader->NextRecPtr = lsn;
	if (!DecodeXLogRecord(reader, decode_buf, record, lsn, &errormsg))
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("neon_walredo: could not decode record ending at %X/%X: %s",
						LSN_FORMAT_ARGS(lsn), errormsg ? errormsg : "unknown error")));
	decode_buf->next_lsn = lsn;
	/* Redo routines use EndRecPtr as the new page LSN. */
	reader->record = decode_buf;

	errcallback.callback = apply_error_callback;
	errcallback.arg = (void *) reader;
	errcallback.previous = error_context_stack;
	error_context_stack = &errcallback;

	/* Sizes, files and sentinels for every referenced block. */
	nsentinels = 0;
	for (int block_id = 0; block_id <= decode_buf->max_block_id; block_id++)
	{
		DecodedBkpBlock *blk = &decode_buf->blocks[block_id];
		WalRedoTag	tag;
		SMgrRelation reln;
		bool		inits;

		if (!blk->in_use)
			continue;
		if (blk->forknum > MAX_FORKNUM)
			ereport(ERROR,
					(errcode(ERRCODE_DATA_CORRUPTED),
					 errmsg("neon_walredo: invalid fork number %d in block reference %d",
							blk->forknum, block_id)));
		tag.rnode = blk->rnode;
		tag.forknum = blk->forknum;
		tag.blkno = blk->blkno;

		reln = prepare_relation(tag.rnode);
		cover_block(reln, tag.forknum, tag.blkno);

		inits = blk->apply_image || (blk->flags & BKPBLOCK_WILL_INIT) != 0;
		if (tags_equal(&tag, &target))
		{
			refs_target = true;
			if (inits)
				inits_target = true;
		}
		else if (!inits)
			sentinels[nsentinels++] = tag;
	}

	if (!refs_target)
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("neon_walredo: record does not reference the target block %u/%u/%u fork %s blk %u",
						target.rnode.spcNode, target.rnode.dbNode, target.rnode.relNode,
						fork_name(target.forknum), target.blkno)));
	if (!target_valid && !inits_target)
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("neon_walredo: no base image for block %u/%u/%u fork %s blk %u, and the record does not initialize it",
						target.rnode.spcNode, target.rnode.dbNode, target.rnode.relNode,
						fork_name(target.forknum), target.blkno)));

	for (int i = 0; i < nsentinels; i++)
		install_sentinel(&sentinels[i]);

	GetRmgr(record->xl_rmid).rm_redo(reader);

	/* Put back any sentinel the redo routine changed. */
	for (int i = 0; i < nsentinels; i++)
		install_sentinel(&sentinels[i]);
	nsentinels = 0;

	error_context_stack = errcallback.previous;
	reader->record = NULL;

	if (inits_target)
		target_valid = true;
	if (request_nrecords == 0)
		request_first_lsn = lsn;
	request_last_lsn = lsn;
	request_nrecords++;
}

/* 'G': tag; writes the page into page_out */
void
walredo_get_page(const char *payload, int len, char *page_out)
{
	WalRedoTag	tag;
	Buffer		buf;

	check_length("GetPage", len, WALREDO_TAG_SIZE);
	if (!in_request)
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("neon_walredo: GetPage without BeginRedoForBlock")));
	parse_tag(payload, &tag);
	if (!tags_equal(&tag, &target))
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("neon_walredo: GetPage for block %u/%u/%u fork %s blk %u, but the target is %u/%u/%u fork %s blk %u",
						tag.rnode.spcNode, tag.rnode.dbNode, tag.rnode.relNode,
						fork_name(tag.forknum), tag.blkno,
						target.rnode.spcNode, target.rnode.dbNode, target.rnode.relNode,
						fork_name(target.forknum), target.blkno)));
	if (!target_valid)
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("neon_walredo: no page to return for block %u/%u/%u fork %s blk %u: no base image was pushed and no record initialized it",
						target.rnode.spcNode, target.rnode.dbNode, target.rnode.relNode,
						fork_name(target.forknum), target.blkno)));

	buf = ReadBufferWithoutRelcache(tag.rnode, tag.forknum, tag.blkno,
									RBM_NORMAL, NULL, true);
	LockBuffer(buf, BUFFER_LOCK_SHARE);
	memcpy(page_out, BufferGetPage(buf), BLCKSZ);
	UnlockReleaseBuffer(buf);

	if (walredo_log_each_request)
		ereport(LOG,
				(errmsg("neon_walredo: request for %u/%u/%u fork %s blk %u: %s base image, %d records (%X/%X..%X/%X), page lsn %X/%X",
						target.rnode.spcNode, target.rnode.dbNode, target.rnode.relNode,
						fork_name(target.forknum), target.blkno,
						target_pushed ? "with" : "no",
						request_nrecords,
						LSN_FORMAT_ARGS(request_first_lsn),
						LSN_FORMAT_ARGS(request_last_lsn),
						LSN_FORMAT_ARGS(PageGetLSN((Page) page_out)))));

	end_request();
}

/*
 * Forget the request: drop every buffer of every touched relation without
 * writing it, remove the files if anything was written to them, and process
 * the pending sync requests (file creation queues some).
 */
static void
end_request(void)
{
	SMgrRelation *rels;
	bool		written;

	rels = palloc(sizeof(SMgrRelation) * Max(ntouched, 1));
	for (int i = 0; i < ntouched; i++)
		rels[i] = smgropen(touched[i], InvalidBackendId);

	DropRelFileNodesAllBuffers(rels, ntouched);

	for (int i = 0; i < ntouched; i++)
	{
		for (ForkNumber forknum = 0; forknum <= MAX_FORKNUM; forknum++)
			XLogDropRelation(touched[i], forknum);
	}

	written = pgBufferUsage.shared_blks_written != written_at_begin;
	if (written)
	{
		for (int i = 0; i < ntouched; i++)
		{
			RelFileNodeBackend rnode = rels[i]->smgr_rnode;

			smgrclose(rels[i]);
			mdunlink(rnode, InvalidForkNumber, true);
		}
	}
	pfree(rels);

	ProcessSyncRequests();

	ntouched = 0;
	nsentinels = 0;
	in_request = false;
	target_valid = false;
	target_pushed = false;
}

/* 'M': rmid u8 + blkno u32 BE + page; writes the masked page into page_out */
void
walredo_mask_page(const char *payload, int len, char *page_out)
{
	uint8		rmid;
	uint32		netblk;
	BlockNumber blkno;
	const RmgrData *rmgr;

	check_length("MaskPage", len, 1 + 4 + BLCKSZ);
	rmid = (uint8) payload[0];
	memcpy(&netblk, payload + 1, sizeof(netblk));
	blkno = pg_ntoh32(netblk);

	if (!RmgrIdExists(rmid))
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("neon_walredo: MaskPage for unknown resource manager %u", rmid)));
	rmgr = &RmgrTable[rmid];
	if (rmgr->rm_mask == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("neon_walredo: resource manager %s has no mask function", rmgr->rm_name)));

	/* page_out is aligned; mask in place there. */
	memcpy(page_out, payload + 5, BLCKSZ);
	/* An all-zero page has nothing to mask (and would fail the header checks). */
	if (!PageIsNew((Page) page_out))
		rmgr->rm_mask(page_out, blkno);
}
