"""Which DICOM attributes identify a patient, a visit or a staff member (invariant 8): the
one list that provenance (refusing such keys) and selection (never quoting such values)
both follow."""

from __future__ import annotations

import re

# DICOM attributes that identify a patient, visit or staff member (PS3.15 Annex E, the
# common ones), as keywords and as tags; compared on lower-case alphanumerics so that
# "patient_name", "PatientName" and "(0010,0010)" all match.
_IDENTIFIER_KEYS = frozenset(
    re.sub(r"[^a-z0-9]", "", k.lower())
    for k in (
        "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "PatientAddress",
        "PatientTelephoneNumbers", "PatientMotherBirthName", "OtherPatientIDs",
        "OtherPatientIDsSequence", "OtherPatientNames", "IssuerOfPatientID",
        "MedicalRecordLocator", "AccessionNumber", "StudyID", "StudyInstanceUID",
        "SeriesInstanceUID", "SOPInstanceUID", "StudyDate", "StudyTime", "AcquisitionDateTime",
        "InstitutionName", "InstitutionAddress", "ReferringPhysicianName",
        "PerformingPhysicianName", "PhysiciansOfRecord", "RequestingPhysician",
        "OperatorsName", "DeviceSerialNumber", "EthnicGroup", "Occupation", "MilitaryRank",
        "AdmissionID", "(0010,0010)", "(0010,0020)", "(0010,0030)", "(0008,0050)",
        "(0020,000D)", "(0020,000E)", "(0008,0018)",
    )
)  # fmt: skip
# Every Patient* attribute (age, sex, size, ...) describes the person: none belongs here.
_IDENTIFIER_PREFIX = "patient"


def is_identifier(key: str) -> bool:
    """Whether `key` (a keyword, snake_case name or "(gggg,eeee)" tag) names an identifier."""
    norm = re.sub(r"[^a-z0-9]", "", key.lower())
    return norm in _IDENTIFIER_KEYS or norm.startswith(_IDENTIFIER_PREFIX)
